//! Header field names (RFC 3261 §7.3, §20) including the compact forms of §7.3.3 and the
//! IANA-registered ones from later RFCs, and which of them are comma-separated lists (§7.3.1).

use std::fmt;

/// The header fields the engine knows by name. Everything else is `Other` and is kept and
/// compared by its raw name, case-insensitively (§7.3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Accept,
    AcceptContact,
    AcceptEncoding,
    AcceptLanguage,
    Allow,
    AllowEvents,
    Authorization,
    CallId,
    Contact,
    ContentEncoding,
    ContentLength,
    ContentType,
    CSeq,
    Date,
    Event,
    Expires,
    From,
    Identity,
    MaxForwards,
    MinExpires,
    Path,
    ProxyAuthenticate,
    ProxyAuthorization,
    ProxyRequire,
    RecordRoute,
    ReferTo,
    ReferredBy,
    RejectContact,
    RequestDisposition,
    Require,
    RetryAfter,
    Route,
    Server,
    SessionExpires,
    Subject,
    Supported,
    Timestamp,
    To,
    Unsupported,
    UserAgent,
    Via,
    Warning,
    WwwAuthenticate,
    Other,
}

// `Message::validate` keeps one bit per name in a u64.
const _: () = assert!((HeaderName::Other as u8) < 64);

/// Longest known full name ("Request-Disposition", "Proxy-Authorization") is 19 bytes.
const MAX_KNOWN_LEN: usize = 19;

impl HeaderName {
    /// Classifies a raw header name (already trimmed), accepting any letter case and the
    /// compact forms of §7.3.3 and their IANA registrations (o, u, r, b, x, y, a, j, d).
    pub fn classify(raw: &[u8]) -> HeaderName {
        if raw.is_empty() || raw.len() > MAX_KNOWN_LEN {
            return HeaderName::Other;
        }
        let mut buf = [0u8; MAX_KNOWN_LEN];
        let lower = &mut buf[..raw.len()];
        for (d, s) in lower.iter_mut().zip(raw) {
            *d = s.to_ascii_lowercase();
        }
        use HeaderName::*;
        match &*lower {
            b"via" | b"v" => Via,
            b"from" | b"f" => From,
            b"to" | b"t" => To,
            b"call-id" | b"i" => CallId,
            b"cseq" => CSeq,
            b"max-forwards" => MaxForwards,
            b"contact" | b"m" => Contact,
            b"content-length" | b"l" => ContentLength,
            b"content-type" | b"c" => ContentType,
            b"route" => Route,
            b"record-route" => RecordRoute,
            b"expires" => Expires,
            b"supported" | b"k" => Supported,
            b"require" => Require,
            b"proxy-require" => ProxyRequire,
            b"unsupported" => Unsupported,
            b"path" => Path,
            b"allow" => Allow,
            b"accept" => Accept,
            b"accept-encoding" => AcceptEncoding,
            b"accept-language" => AcceptLanguage,
            b"accept-contact" | b"a" => AcceptContact,
            b"allow-events" | b"u" => AllowEvents,
            b"authorization" => Authorization,
            b"proxy-authorization" => ProxyAuthorization,
            b"www-authenticate" => WwwAuthenticate,
            b"proxy-authenticate" => ProxyAuthenticate,
            b"content-encoding" | b"e" => ContentEncoding,
            b"date" => Date,
            b"event" | b"o" => Event,
            b"identity" | b"y" => Identity,
            b"min-expires" => MinExpires,
            b"refer-to" | b"r" => ReferTo,
            b"referred-by" | b"b" => ReferredBy,
            b"reject-contact" | b"j" => RejectContact,
            b"request-disposition" | b"d" => RequestDisposition,
            b"retry-after" => RetryAfter,
            b"server" => Server,
            b"session-expires" | b"x" => SessionExpires,
            b"subject" | b"s" => Subject,
            b"timestamp" => Timestamp,
            b"user-agent" => UserAgent,
            b"warning" => Warning,
            _ => Other,
        }
    }

    /// The canonical (long) name used when the engine writes this header itself.
    pub fn as_str(self) -> &'static str {
        use HeaderName::*;
        match self {
            Accept => "Accept",
            AcceptContact => "Accept-Contact",
            AcceptEncoding => "Accept-Encoding",
            AcceptLanguage => "Accept-Language",
            Allow => "Allow",
            AllowEvents => "Allow-Events",
            Authorization => "Authorization",
            CallId => "Call-ID",
            Contact => "Contact",
            ContentEncoding => "Content-Encoding",
            ContentLength => "Content-Length",
            ContentType => "Content-Type",
            CSeq => "CSeq",
            Date => "Date",
            Event => "Event",
            Expires => "Expires",
            From => "From",
            Identity => "Identity",
            MaxForwards => "Max-Forwards",
            MinExpires => "Min-Expires",
            Path => "Path",
            ProxyAuthenticate => "Proxy-Authenticate",
            ProxyAuthorization => "Proxy-Authorization",
            ProxyRequire => "Proxy-Require",
            RecordRoute => "Record-Route",
            ReferTo => "Refer-To",
            ReferredBy => "Referred-By",
            RejectContact => "Reject-Contact",
            RequestDisposition => "Request-Disposition",
            Require => "Require",
            RetryAfter => "Retry-After",
            Route => "Route",
            Server => "Server",
            SessionExpires => "Session-Expires",
            Subject => "Subject",
            Supported => "Supported",
            Timestamp => "Timestamp",
            To => "To",
            Unsupported => "Unsupported",
            UserAgent => "User-Agent",
            Via => "Via",
            Warning => "Warning",
            WwwAuthenticate => "WWW-Authenticate",
            Other => "",
        }
    }

    /// Headers whose grammar is a comma-separated list, so that several values may share one
    /// line (§7.3.1). Authorization-style headers carry commas inside one value and are not.
    pub fn is_list(self) -> bool {
        use HeaderName::*;
        matches!(
            self,
            Via | Contact
                | Route
                | RecordRoute
                | Path
                | Require
                | ProxyRequire
                | Supported
                | Unsupported
                | Allow
                | AllowEvents
                | Accept
                | AcceptEncoding
                | AcceptLanguage
                | AcceptContact
                | RejectContact
                | RequestDisposition
                | Warning
        )
    }

    /// Headers that may appear at most once (§20: their grammar has no list form). A message
    /// repeating one of these is malformed (RFC 4475 §3.3.8, §3.3.9).
    pub fn is_single(self) -> bool {
        use HeaderName::*;
        matches!(
            self,
            From | To | CallId | CSeq | MaxForwards | ContentLength | ContentType | Expires
        )
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_compact_forms() {
        assert_eq!(
            HeaderName::classify(b"MaX-fOrWaRdS"),
            HeaderName::MaxForwards
        );
        assert_eq!(HeaderName::classify(b"v"), HeaderName::Via);
        assert_eq!(HeaderName::classify(b"V"), HeaderName::Via);
        assert_eq!(HeaderName::classify(b"i"), HeaderName::CallId);
        assert_eq!(HeaderName::classify(b"l"), HeaderName::ContentLength);
        assert_eq!(HeaderName::classify(b"C%6Fntact"), HeaderName::Other);
        assert_eq!(
            HeaderName::classify(b"Request-Disposition"),
            HeaderName::RequestDisposition
        );
        assert_eq!(
            HeaderName::classify(b"X-Much-Longer-Than-Any-Known"),
            HeaderName::Other
        );
    }
}
