//! SIP extensions by option tag (RFC 3261 §19.2): which of the extensions a request requires
//! its recipient to understand are not supported, for the 420 (Bad Extension) answer and its
//! Unsupported header (§20.40, §21.4.15). A UAS checks Require (§8.2.2.3); a proxy checks
//! Proxy-Require (§16.3 item 5) and leaves Require to the UAS.
//!
//! One rule for every place that answers 420: the server's own OPTIONS answers, the proxy's
//! request checks (`proxy::request::check_request`) and the registrar (`script`).

use super::{HeaderName, Message, ParseError};

/// The option tags of the extensions this server supports: none. Path (RFC 3327) and outbound
/// (RFC 5626) bindings are stored without their option tags being required, and no extension
/// is honoured because a request requires it, so a Require or Proxy-Require naming any tag is
/// refused with 420 (and an OPTIONS answer's Supported header is empty).
pub const SUPPORTED: &[&str] = &[];

/// The option tags listed in `headers` (Require, Proxy-Require) that are not in `supported`,
/// as the value of an Unsupported header: comma-separated, in order, each listed once
/// (compared ignoring case, §19.2 and §20.40). `Ok(None)` when every tag is supported;
/// `Err` when a listed value is not an option tag (§25.1 `option-tag = token`).
pub fn unsupported(
    request: &Message,
    headers: &[HeaderName],
    supported: &[&str],
) -> Result<Option<String>, ParseError> {
    let mut list = String::new();
    for &name in headers {
        for tag in request.option_tags(name) {
            let tag = tag?;
            let known = supported
                .iter()
                .any(|s| s.as_bytes().eq_ignore_ascii_case(tag));
            if known || is_listed(&list, tag) {
                continue;
            }
            if !list.is_empty() {
                list.push_str(", ");
            }
            // Option tags are tokens (checked by `option_tags`), hence ASCII.
            list.push_str(&String::from_utf8_lossy(tag));
        }
    }
    Ok((!list.is_empty()).then_some(list))
}

fn is_listed(list: &str, tag: &[u8]) -> bool {
    !list.is_empty()
        && list
            .split(", ")
            .any(|listed| listed.as_bytes().eq_ignore_ascii_case(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &str) -> Message {
        let text = format!(
            "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: c\r\n\
             CSeq: 1 OPTIONS\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        Message::parse(bytes::Bytes::from(text)).unwrap()
    }

    const BOTH: &[HeaderName] = &[HeaderName::Require, HeaderName::ProxyRequire];

    #[test]
    fn nothing_required_is_supported() {
        assert_eq!(unsupported(&request(""), BOTH, SUPPORTED), Ok(None));
    }

    #[test]
    fn lists_each_unsupported_tag_once_in_order() {
        let r = request("Require: foo, Bar\r\nProxy-Require: bar, baz\r\nRequire: FOO\r\n");
        assert_eq!(
            unsupported(&r, BOTH, &[]),
            Ok(Some("foo, Bar, baz".to_owned()))
        );
    }

    #[test]
    fn supported_tags_match_ignoring_case() {
        let r = request("Proxy-Require: Path, gruu\r\n");
        let only_proxy = &[HeaderName::ProxyRequire];
        assert_eq!(
            unsupported(&r, only_proxy, &["path"]),
            Ok(Some("gruu".to_owned()))
        );
        assert_eq!(unsupported(&r, only_proxy, &["PATH", "GRUU"]), Ok(None));
    }

    #[test]
    fn checks_only_the_headers_asked_for() {
        let r = request("Require: 100rel\r\n");
        assert_eq!(unsupported(&r, &[HeaderName::ProxyRequire], &[]), Ok(None));
        assert_eq!(
            unsupported(&r, &[HeaderName::Require], &[]),
            Ok(Some("100rel".to_owned()))
        );
    }

    #[test]
    fn a_value_that_is_not_a_token_is_an_error() {
        let r = request("Proxy-Require: foo, b@d\r\n");
        assert!(unsupported(&r, &[HeaderName::ProxyRequire], &[]).is_err());
    }
}
