//! Which names a server certificate proves, and whether one of them is the SIP domain we meant
//! to reach (RFC 5922 §7.1, §7.2).
//!
//! Rules, for a SIP domain (a DNS name):
//! - subjectAltName URI values with the scheme `sip` and no user part (no `@`) are the
//!   certificate's SIP domain identities: when there is at least one, the domain must equal one
//!   of their host parts, and nothing else is looked at (§7.1 item 1: a DNS name counts "if and
//!   only if no other identity is found that matches the sip URI type"). Other schemes (`sips`
//!   included) are not SIP domain identities.
//! - otherwise a subjectAltName dNSName must equal the domain;
//! - only when the certificate has no subjectAltName extension at all, the subject's common
//!   name (CN) may (§7.1 item 2);
//! - the comparison is exact and case-insensitive; wildcards never match (§7.2): `*.example.com`
//!   is not `sip.example.com`. One trailing dot is ignored on both sides.
//!
//! For an IP address (a next hop given as an IP literal, or a response sent to a Via address)
//! RFC 5922 has no rule; an iPAddress subjectAltName equal to it is required, as for HTTPS.
//!
//! The certificate has already passed chain validation (rustls-webpki parsed it) when this runs,
//! but the DER walker below trusts nothing: every length is checked against what remains, it
//! never recurses, and malformed input just yields no identity. Only the few fields needed are
//! read: the subject (for CN) and the subjectAltName extension.

use std::net::IpAddr;

use rustls::pki_types::ServerName;

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_BOOLEAN: u8 = 0x01;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_VERSION: u8 = 0xA0;
const TAG_ISSUER_UID: u8 = 0x81;
const TAG_SUBJECT_UID: u8 = 0x82;
const TAG_EXTENSIONS: u8 = 0xA3;
/// GeneralName choices (RFC 5280 §4.2.1.6), context-specific and primitive.
const TAG_DNS_NAME: u8 = 0x82;
const TAG_URI: u8 = 0x86;
const TAG_IP_ADDRESS: u8 = 0x87;
/// id-ce-subjectAltName, 2.5.29.17, as OID content bytes.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];
/// id-at-commonName, 2.5.4.3.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// DirectoryString choices a CN may use that are ASCII-compatible.
const STRING_TAGS: &[u8] = &[
    0x0C, /* UTF8 */
    0x13, /* Printable */
    0x14, /* T61 */
    0x16, /* IA5 */
];

/// The names a certificate carries that RFC 5922 matching looks at.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Identities {
    /// Whether the certificate has a subjectAltName extension (even an empty one).
    pub(crate) has_subject_alt_name: bool,
    /// Hosts of `sip:` URI subjectAltNames without a user part.
    pub(crate) sip_domains: Vec<String>,
    /// dNSName subjectAltNames.
    pub(crate) dns_names: Vec<String>,
    /// iPAddress subjectAltNames.
    pub(crate) ip_addresses: Vec<IpAddr>,
    /// Subject common names.
    pub(crate) common_names: Vec<String>,
}

impl Identities {
    /// Reads a DER certificate; `None` when it cannot be walked.
    pub(crate) fn parse(cert: &[u8]) -> Option<Identities> {
        let mut outer = Der::new(cert);
        let certificate = outer.expect(TAG_SEQUENCE)?;
        let mut certificate = Der::new(certificate);
        let tbs = certificate.expect(TAG_SEQUENCE)?;
        let mut tbs = Der::new(tbs);
        if tbs.peek_tag() == Some(TAG_VERSION) {
            tbs.next()?;
        }
        tbs.next()?; // serialNumber
        tbs.expect(TAG_SEQUENCE)?; // signature
        tbs.expect(TAG_SEQUENCE)?; // issuer
        tbs.expect(TAG_SEQUENCE)?; // validity
        let subject = tbs.expect(TAG_SEQUENCE)?;
        tbs.expect(TAG_SEQUENCE)?; // subjectPublicKeyInfo
        let mut identities = Identities {
            common_names: common_names(subject),
            ..Identities::default()
        };
        while let Some((tag, content)) = tbs.next() {
            match tag {
                TAG_ISSUER_UID | TAG_SUBJECT_UID => {}
                TAG_EXTENSIONS => identities.read_extensions(content)?,
                _ => return None,
            }
        }
        Some(identities)
    }

    fn read_extensions(&mut self, explicit: &[u8]) -> Option<()> {
        let extensions = Der::new(explicit).expect(TAG_SEQUENCE)?;
        let mut extensions = Der::new(extensions);
        while let Some(extension) = extensions.next_of(TAG_SEQUENCE)? {
            let mut extension = Der::new(extension);
            let oid = extension.expect(TAG_OID)?;
            if extension.peek_tag() == Some(TAG_BOOLEAN) {
                extension.next()?; // critical
            }
            let value = extension.expect(TAG_OCTET_STRING)?;
            if oid == OID_SUBJECT_ALT_NAME {
                if self.has_subject_alt_name {
                    return None; // RFC 5280 §4.2: an extension appears at most once
                }
                self.has_subject_alt_name = true;
                self.read_general_names(value)?;
            }
        }
        Some(())
    }

    fn read_general_names(&mut self, value: &[u8]) -> Option<()> {
        let names = Der::new(value).expect(TAG_SEQUENCE)?;
        let mut names = Der::new(names);
        while let Some((tag, content)) = names.next() {
            match tag {
                TAG_DNS_NAME => {
                    if let Ok(name) = std::str::from_utf8(content) {
                        self.dns_names.push(name.to_owned());
                    }
                }
                TAG_URI => {
                    if let Some(host) = std::str::from_utf8(content).ok().and_then(sip_uri_host) {
                        self.sip_domains.push(host.to_owned());
                    }
                }
                TAG_IP_ADDRESS => {
                    if let Ok(v4) = <[u8; 4]>::try_from(content) {
                        self.ip_addresses.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(content) {
                        self.ip_addresses.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
        Some(())
    }

    /// Whether these identities prove `name` (see the module docs).
    pub(crate) fn matches(&self, name: &ServerName<'_>) -> bool {
        match name {
            ServerName::DnsName(domain) => self.matches_domain(domain.as_ref()),
            ServerName::IpAddress(ip) => self.ip_addresses.contains(&IpAddr::from(*ip)),
            _ => false,
        }
    }

    fn matches_domain(&self, domain: &str) -> bool {
        if !self.sip_domains.is_empty() {
            return self.sip_domains.iter().any(|d| same_domain(d, domain));
        }
        if self.has_subject_alt_name {
            return self.dns_names.iter().any(|d| same_domain(d, domain));
        }
        self.common_names.iter().any(|cn| same_domain(cn, domain))
    }
}

/// Whether `cert` (DER) proves `name`; false when it cannot be read.
pub(crate) fn certificate_matches(cert: &[u8], name: &ServerName<'_>) -> bool {
    Identities::parse(cert).is_some_and(|identities| identities.matches(name))
}

/// Exact, case-insensitive equality of two DNS names, one trailing dot ignored; a name with a
/// wildcard never matches (RFC 5922 §7.2).
fn same_domain(presented: &str, wanted: &str) -> bool {
    let presented = presented.strip_suffix('.').unwrap_or(presented);
    let wanted = wanted.strip_suffix('.').unwrap_or(wanted);
    !presented.is_empty() && !presented.contains('*') && presented.eq_ignore_ascii_case(wanted)
}

/// The host of a `sip:` URI without a user part (RFC 5922 §7.1): `sip:example.com;lr` gives
/// `example.com`. `None` for other schemes, a user part, or no host.
fn sip_uri_host(uri: &str) -> Option<&str> {
    let (scheme, rest) = uri.split_once(':')?;
    if !scheme.eq_ignore_ascii_case("sip") || rest.contains('@') {
        return None;
    }
    let end = rest.find([';', '?', ':']).unwrap_or(rest.len());
    let host = &rest[..end];
    (!host.is_empty() && !host.starts_with('[')).then_some(host)
}

/// The CN values of a Name (RFC 5280 §4.1.2.4) that are ASCII-compatible strings.
fn common_names(name: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut rdns = Der::new(name);
    while let Some(Some(rdn)) = rdns.next_of(TAG_SET) {
        let mut attributes = Der::new(rdn);
        while let Some(Some(attribute)) = attributes.next_of(TAG_SEQUENCE) {
            let mut attribute = Der::new(attribute);
            let (Some(oid), Some((tag, value))) = (attribute.expect(TAG_OID), attribute.next())
            else {
                continue;
            };
            if oid == OID_COMMON_NAME && STRING_TAGS.contains(&tag) {
                if let Ok(value) = std::str::from_utf8(value) {
                    found.push(value.to_owned());
                }
            }
        }
    }
    found
}

/// A cursor over DER TLVs. Single-byte tags only (all the certificate fields read use them);
/// definite lengths of up to four bytes.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(data: &'a [u8]) -> Self {
        Der { rest: data }
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next TLV's tag and content; `None` at the end or on malformed input (the cursor is
    /// then emptied, so a loop over `next` always ends).
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let parsed = self.parse_next();
        if parsed.is_none() {
            self.rest = &[];
        }
        parsed
    }

    fn parse_next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        if tag & 0x1F == 0x1F {
            return None; // high tag number form
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 || rest.len() < count {
                return None; // indefinite or absurd length
            }
            let (bytes, after) = rest.split_at(count);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b))
        };
        if rest.len() < len {
            return None;
        }
        let (content, after) = rest.split_at(len);
        self.rest = after;
        Some((tag, content))
    }

    /// The next TLV's content, which must have tag `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (found, content) if found == tag => Some(content),
            _ => None,
        }
    }

    /// `Some(None)` at the end, `Some(Some(content))` for a TLV with tag `tag`, `None` for
    /// anything else.
    fn next_of(&mut self, tag: u8) -> Option<Option<&'a [u8]>> {
        if self.rest.is_empty() {
            return Some(None);
        }
        self.expect(tag).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "moonroute tests");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    fn uri(uri: &str) -> SanType {
        SanType::URI(uri.try_into().unwrap())
    }

    fn matches(cert: &[u8], name: &str) -> bool {
        certificate_matches(cert, &ServerName::try_from(name).unwrap())
    }

    #[test]
    fn reads_every_kind_of_name() {
        let der = cert(
            vec![
                uri("sip:example.com"),
                uri("sip:alice@example.com"),
                uri("sips:secure.example.com"),
                uri("https://example.com/"),
                dns("proxy.example.com"),
                SanType::IpAddress("192.0.2.1".parse().unwrap()),
                SanType::IpAddress("2001:db8::1".parse().unwrap()),
            ],
            Some("cn.example.com"),
        );
        let identities = Identities::parse(&der).unwrap();
        assert_eq!(
            identities,
            Identities {
                has_subject_alt_name: true,
                sip_domains: vec!["example.com".into()],
                dns_names: vec!["proxy.example.com".into()],
                ip_addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
                common_names: vec!["cn.example.com".into()],
            }
        );
    }

    #[test]
    fn sip_uri_identities_take_precedence_over_dns_names() {
        let der = cert(vec![uri("sip:Example.COM"), dns("proxy.example.com")], None);
        assert!(matches(&der, "example.com"), "host part, any case");
        assert!(
            !matches(&der, "proxy.example.com"),
            "a dNSName counts only without sip URI identities (§7.1)"
        );
    }

    #[test]
    fn uri_with_user_part_or_other_scheme_is_no_domain_identity() {
        let der = cert(
            vec![
                uri("sip:alice@example.com"),
                uri("sips:example.com"),
                dns("example.org"),
            ],
            None,
        );
        assert!(!matches(&der, "example.com"));
        assert!(matches(&der, "example.org"), "the dNSName counts then");
    }

    #[test]
    fn sip_uri_host_drops_port_and_parameters() {
        assert_eq!(
            sip_uri_host("sip:example.com:5061;transport=tls"),
            Some("example.com")
        );
        assert_eq!(sip_uri_host("SIP:example.com?x=y"), Some("example.com"));
        assert_eq!(sip_uri_host("sip:bob@example.com"), None);
        assert_eq!(sip_uri_host("sips:example.com"), None);
        assert_eq!(sip_uri_host("sip:"), None);
    }

    #[test]
    fn dns_names_match_exactly_and_ignore_case() {
        let der = cert(vec![dns("sip.Example.com")], None);
        assert!(matches(&der, "SIP.example.COM"));
        assert!(matches(&der, "sip.example.com."));
        assert!(!matches(&der, "example.com"));
        assert!(!matches(&der, "a.sip.example.com"));
    }

    #[test]
    fn wildcards_never_match() {
        let der = cert(vec![dns("*.example.com")], None);
        assert!(!matches(&der, "sip.example.com"));
        let der = cert(vec![uri("sip:*.example.com")], None);
        assert!(!matches(&der, "sip.example.com"));
        let der = cert(Vec::new(), Some("*.example.com"));
        assert!(!matches(&der, "sip.example.com"));
    }

    #[test]
    fn common_name_only_without_subject_alt_name() {
        let der = cert(Vec::new(), Some("sip.example.com"));
        assert!(matches(&der, "sip.example.com"));
        let der = cert(vec![dns("other.example.com")], Some("sip.example.com"));
        assert!(
            !matches(&der, "sip.example.com"),
            "CN is ignored when there is a subjectAltName"
        );
    }

    #[test]
    fn ip_addresses_match_ip_subject_alt_names_only() {
        let der = cert(
            vec![
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
                dns("localhost"),
            ],
            Some("127.0.0.2"),
        );
        assert!(matches(&der, "127.0.0.1"));
        assert!(!matches(&der, "127.0.0.2"));
        assert!(!matches(&der, "::1"));
        assert!(matches(&der, "localhost"));
    }

    #[test]
    fn malformed_input_yields_nothing_and_never_panics() {
        let der = cert(vec![dns("example.com")], Some("example.com"));
        assert!(Identities::parse(&[]).is_none());
        // Every truncation and every single-byte corruption: no panic.
        for len in 0..der.len() {
            let _ = Identities::parse(&der[..len]);
        }
        for index in 0..der.len() {
            for flip in [0x01, 0x80, 0xFF] {
                let mut bad = der.clone();
                bad[index] ^= flip;
                let _ = Identities::parse(&bad);
            }
        }
        // Lengths running past the end, indefinite and oversized length forms.
        for bad in [
            &[0x30, 0x05, 0x30][..],
            &[0x30, 0x80, 0x00, 0x00],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0x1F, 0x01, 0x00],
        ] {
            assert!(Identities::parse(bad).is_none());
        }
    }
}
