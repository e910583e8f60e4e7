//! Property tests of the SIP codec.
//!
//! Requests and responses are built from generated parts (methods, URIs, Vias, name-addrs,
//! unknown headers, header-name spelling, LWS around colons, folds, binary bodies), so every
//! expectation is known without re-implementing the parser: the message must parse, validate,
//! serialize to its own bytes, expose the generated values through the typed accessors, and
//! survive the proxy's edits with every untouched header forwarded byte for byte, in order.
//! Other properties feed arbitrary and mutated bytes to check nothing panics.
//!
//! Every host named is an example domain, 127.0.0.1 or ::1; nothing is sent anywhere.
//! `PROPTEST_CASES` raises the case counts for a longer run.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use moonroute::sip::{Contact, HeaderName, Host, Message, Uri, Via};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};

// ----- generated parts --------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SipUriParts {
    scheme: String,
    user: Option<String>,
    host: String,
    port: Option<u16>,
    /// The rendered `;name=value` section (possibly empty).
    params: String,
}

impl SipUriParts {
    fn render(&self) -> String {
        let mut s = format!("{}:", self.scheme);
        if let Some(u) = &self.user {
            s.push_str(u);
            s.push('@');
        }
        s.push_str(&self.host);
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s.push_str(&self.params);
        s
    }
}

#[derive(Clone, Debug)]
enum UriParts {
    Sip(SipUriParts),
    Tel { number: String, params: String },
}

impl UriParts {
    fn render(&self) -> String {
        match self {
            UriParts::Sip(s) => s.render(),
            UriParts::Tel { number, params } => format!("tel:{number}{params}"),
        }
    }
}

#[derive(Clone, Debug)]
struct ViaParts {
    sep: &'static str,
    transport: &'static str,
    host: String,
    port: Option<u16>,
    branch: String,
    rport: bool,
}

impl ViaParts {
    fn render(&self) -> String {
        let sep = self.sep;
        let mut s = format!("SIP{sep}2.0{sep}{} {}", self.transport, self.host);
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s.push_str(";branch=");
        s.push_str(&self.branch);
        if self.rport {
            s.push_str(";rport");
        }
        s
    }
}

#[derive(Clone, Debug)]
struct NameAddrParts {
    display: Option<String>,
    uri: UriParts,
    tag: Option<String>,
}

impl NameAddrParts {
    fn render(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.display {
            s.push_str(d);
            s.push(' ');
        }
        s.push_str(&format!("<{}>", self.uri.render()));
        if let Some(t) = &self.tag {
            s.push_str(";tag=");
            s.push_str(t);
        }
        s
    }
}

#[derive(Clone, Debug)]
struct ContactParts {
    display: Option<String>,
    uri: SipUriParts,
    expires: Option<u32>,
    q: Option<(&'static str, u16)>,
    instance: Option<String>,
}

impl ContactParts {
    fn render(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.display {
            s.push_str(d);
            s.push(' ');
        }
        s.push_str(&format!("<{}>", self.uri.render()));
        if let Some(e) = self.expires {
            s.push_str(&format!(";expires={e}"));
        }
        if let Some((q, _)) = self.q {
            s.push_str(&format!(";q={q}"));
        }
        if let Some(i) = &self.instance {
            s.push_str(&format!(";+sip.instance=\"<urn:uuid:{i}>\""));
        }
        s
    }
}

#[derive(Clone, Debug)]
enum FieldKind {
    Via(ViaParts),
    From(NameAddrParts),
    To(NameAddrParts),
    CallId(String),
    CSeq(u32, String),
    MaxForwards(u8),
    Contact(ContactParts),
    RecordRoute(String),
    Expires(u32),
    ContentLength,
    ContentType,
    /// The value as the parser must report it (trimmed, folds kept).
    Unknown(String),
}

#[derive(Clone, Debug)]
struct Field {
    kind: FieldKind,
    name: String,
    /// The whole header line as written, without its CRLF.
    line: String,
}

#[derive(Clone, Debug)]
enum Start {
    Request { method: String, uri: UriParts },
    Response { code: u16, reason: String },
}

#[derive(Clone, Debug)]
struct Generated {
    start: Start,
    fields: Vec<Field>,
    body: Vec<u8>,
}

impl Generated {
    fn start_line(&self) -> String {
        match &self.start {
            Start::Request { method, uri } => format!("{method} {} SIP/2.0", uri.render()),
            Start::Response { code, reason } => format!("SIP/2.0 {code} {reason}"),
        }
    }

    fn render(&self) -> Vec<u8> {
        let mut out = self.start_line().into_bytes();
        out.extend_from_slice(b"\r\n");
        for f in &self.fields {
            out.extend_from_slice(f.line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    fn vias(&self) -> Vec<&ViaParts> {
        self.fields
            .iter()
            .filter_map(|f| match &f.kind {
                FieldKind::Via(v) => Some(v),
                _ => None,
            })
            .collect()
    }
}

// ----- strategies -------------------------------------------------------------------------

const KNOWN_METHODS: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "INFO",
    "UPDATE",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
];

fn method() -> BoxedStrategy<String> {
    prop_oneof![
        select(&KNOWN_METHODS[..]).prop_map(str::to_owned),
        // Extension methods: any token (§7.1), including lower-case spellings of known ones.
        "[A-Za-z0-9.!%*_+`'~-]{1,12}",
    ]
    .boxed()
}

fn host() -> BoxedStrategy<String> {
    prop_oneof![
        4 => ("[a-zA-Z0-9][a-zA-Z0-9-]{0,8}", select(&["example.com", "example.net", "example.org"][..]))
            .prop_map(|(label, domain)| format!("{label}.{domain}")),
        1 => Just("example.com".to_owned()),
        1 => Just("127.0.0.1".to_owned()),
        1 => Just("[::1]".to_owned()),
    ].boxed()
}

/// `;name[=value]` uri-parameters, %HH escapes included (§19.1.1).
fn uri_params() -> BoxedStrategy<String> {
    vec(
        (
            r"([a-zA-Z0-9_.!~*'()\[\]/:&+$-]|%[0-9a-fA-F]{2}){1,8}",
            option::of(r"([a-zA-Z0-9_.!~*'()\[\]/:&+$-]|%[0-9a-fA-F]{2}){1,8}"),
        ),
        0..3,
    )
    .prop_map(|ps| {
        ps.into_iter()
            .map(|(n, v)| match v {
                Some(v) => format!(";{n}={v}"),
                None => format!(";{n}"),
            })
            .collect()
    })
    .boxed()
}

fn sip_uri() -> BoxedStrategy<SipUriParts> {
    (
        select(&["sip", "sips", "SIP", "Sips"][..]),
        option::of(r"([a-zA-Z0-9_.!~*'()&=+$,;?/-]|%[0-9a-fA-F]{2}){1,12}"),
        host(),
        option::of(any::<u16>()),
        uri_params(),
    )
        .prop_map(|(scheme, user, host, port, params)| SipUriParts {
            scheme: scheme.to_owned(),
            user,
            host,
            port,
            params,
        })
        .boxed()
}

fn uri() -> BoxedStrategy<UriParts> {
    prop_oneof![
        4 => sip_uri().prop_map(UriParts::Sip),
        1 => (
            r"\+[0-9]{1,3}(-[0-9]{1,4}){0,3}",
            select(&["", ";phone-context=example.com", ";isub=12;npdi"][..]),
        )
            .prop_map(|(number, params)| UriParts::Tel {
                number,
                params: params.to_owned(),
            }),
    ]
    .boxed()
}

fn display_name() -> BoxedStrategy<Option<String>> {
    option::of(prop_oneof![
        // quoted-string with commas, angle brackets and quoted-pairs inside
        r#""([a-zA-Z0-9 ,;:<>@]|\\["\\a-z]){0,12}""#,
        "[A-Za-z0-9]{1,8}( [A-Za-z0-9]{1,8}){0,2}",
    ])
    .boxed()
}

fn name_addr(with_tag: bool) -> impl Strategy<Value = NameAddrParts> {
    let tag = if with_tag {
        option::of("[a-zA-Z0-9.!%*_+`'~-]{1,12}").boxed()
    } else {
        Just(None).boxed()
    };
    (display_name(), uri(), tag).prop_map(|(display, uri, tag)| NameAddrParts { display, uri, tag })
}

fn via() -> BoxedStrategy<ViaParts> {
    (
        select(&["/", " / ", "/ "][..]),
        select(&["UDP", "TCP", "TLS", "SCTP", "WS", "udp"][..]),
        host(),
        option::of(any::<u16>()),
        "[a-zA-Z0-9.!%*_+`'~-]{1,16}",
        any::<bool>(),
    )
        .prop_map(|(sep, transport, host, port, branch, rport)| ViaParts {
            sep,
            transport,
            host,
            port,
            branch: format!("z9hG4bK{branch}"),
            rport,
        })
        .boxed()
}

/// A header name in long or compact form (§7.3.3), in random letter case (§7.3.5).
fn header_name(long: &'static str, compact: Option<&'static str>) -> BoxedStrategy<String> {
    let forms: Vec<&'static str> = std::iter::once(long).chain(compact).collect();
    select(forms)
        .prop_flat_map(|name| {
            vec(any::<bool>(), name.len()).prop_map(move |upper| {
                name.chars()
                    .zip(upper)
                    .map(|(c, u)| {
                        if u {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect()
            })
        })
        .boxed()
}

/// HCOLON = *( SP / HTAB ) ":" SWS (§25.1), SWS possibly holding a fold.
fn hcolon() -> BoxedStrategy<String> {
    (
        select(&["", " ", "\t", "  "][..]),
        select(&["", " ", "\t", "   ", "\r\n ", " \r\n\t"][..]),
    )
        .prop_map(|(before, after)| format!("{before}:{after}"))
        .boxed()
}

fn field(
    name: BoxedStrategy<String>,
    value: impl Strategy<Value = (FieldKind, String)> + 'static,
) -> BoxedStrategy<Field> {
    (name, hcolon(), value)
        .prop_map(|(name, colon, (kind, value))| Field {
            line: format!("{name}{colon}{value}"),
            name,
            kind,
        })
        .boxed()
}

fn unknown_field() -> BoxedStrategy<Field> {
    let value = (
        "[ -~]{0,30}",
        option::of((select(&[" ", "\t", "   "][..]), "[!-~][ -~]{0,20}")),
    )
        .prop_map(|(first, fold)| {
            let written = match fold {
                Some((ws, more)) => format!("{first}\r\n{ws}{more}"),
                None => first,
            };
            let trimmed = written.trim_matches(|c: char| " \t\r\n".contains(c));
            (FieldKind::Unknown(trimmed.to_owned()), written)
        });
    ("X-[A-Za-z0-9-]{1,10}", hcolon(), value)
        .prop_map(|(name, colon, (kind, value))| Field {
            line: format!("{name}{colon}{value}"),
            name,
            kind,
        })
        .boxed()
}

fn common_fields(cseq_method: String, body_len: usize) -> BoxedStrategy<Vec<Field>> {
    let vias = vec(
        field(
            header_name("Via", Some("v")),
            via().prop_map(|v| {
                let s = v.render();
                (FieldKind::Via(v), s)
            }),
        ),
        1..4,
    );
    let from = field(
        header_name("From", Some("f")),
        name_addr(true).prop_map(|a| {
            let s = a.render();
            (FieldKind::From(a), s)
        }),
    );
    let to = field(
        header_name("To", Some("t")),
        name_addr(true).prop_map(|a| {
            let s = a.render();
            (FieldKind::To(a), s)
        }),
    );
    let call_id = field(
        header_name("Call-ID", Some("i")),
        r#"[-a-zA-Z0-9.!%*_+`'~()<>:\\"/\[\]?{}]{1,16}(@[a-z0-9.]{1,12})?"#
            .prop_map(|c| (FieldKind::CallId(c.clone()), c)),
    );
    let cseq = field(
        header_name("CSeq", None),
        (any::<u32>(), select(&[" ", "  ", "\t"][..])).prop_map(move |(n, ws)| {
            (
                FieldKind::CSeq(n, cseq_method.clone()),
                format!("{n}{ws}{cseq_method}"),
            )
        }),
    );
    let max_forwards = option::of(field(
        header_name("Max-Forwards", None),
        any::<u8>().prop_map(|n| (FieldKind::MaxForwards(n), n.to_string())),
    ));
    let contacts = vec(
        field(
            header_name("Contact", Some("m")),
            (
                display_name(),
                sip_uri(),
                option::of(any::<u32>()),
                option::of(select(
                    &[
                        ("0", 0u16),
                        ("0.5", 500),
                        ("1", 1000),
                        ("0.001", 1),
                        ("1.000", 1000),
                    ][..],
                )),
                option::of("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
            )
                .prop_map(|(display, uri, expires, q, instance)| {
                    let c = ContactParts {
                        display,
                        uri,
                        expires,
                        q,
                        instance,
                    };
                    let s = c.render();
                    (FieldKind::Contact(c), s)
                }),
        ),
        0..3,
    );
    let record_routes = vec(
        field(
            header_name("Record-Route", None),
            host().prop_map(|h| {
                let s = format!("<sip:{h};lr>");
                (FieldKind::RecordRoute(h), s)
            }),
        ),
        0..3,
    );
    let expires = option::of(field(
        header_name("Expires", None),
        any::<u32>().prop_map(|n| (FieldKind::Expires(n), n.to_string())),
    ));
    let unknown = vec(unknown_field(), 0..5);
    let content_length = field(
        header_name("Content-Length", Some("l")),
        Just((FieldKind::ContentLength, body_len.to_string())),
    );
    let content_type = option::weighted(
        if body_len > 0 { 0.9 } else { 0.1 },
        field(
            header_name("Content-Type", Some("c")),
            select(
                &[
                    "application/sdp",
                    "application/octet-stream",
                    "text/plain;charset=utf-8",
                ][..],
            )
            .prop_map(|t| (FieldKind::ContentType, t.to_owned())),
        ),
    );
    (
        vias,
        from,
        to,
        call_id,
        cseq,
        max_forwards,
        contacts,
        record_routes,
        expires,
        unknown,
        content_length,
        content_type,
    )
        .prop_map(
            |(vias, from, to, call_id, cseq, mf, contacts, rrs, exp, unknown, cl, ct)| {
                let mut all = vias;
                all.extend([from, to, call_id, cseq, cl]);
                all.extend(mf);
                all.extend(contacts);
                all.extend(rrs);
                all.extend(exp);
                all.extend(unknown);
                all.extend(ct);
                all
            },
        )
        .prop_shuffle()
        .boxed()
}

fn body() -> BoxedStrategy<Vec<u8>> {
    vec(any::<u8>(), 0..96).boxed()
}

fn request() -> BoxedStrategy<Generated> {
    (method(), uri(), body())
        .prop_flat_map(|(method, uri, body)| {
            let fields = common_fields(method.clone(), body.len());
            (Just(Start::Request { method, uri }), fields, Just(body)).prop_map(
                |(start, fields, body)| Generated {
                    start,
                    fields,
                    body,
                },
            )
        })
        .boxed()
}

fn response() -> BoxedStrategy<Generated> {
    (100u16..700, "[ -~]{0,20}", method(), body())
        .prop_flat_map(|(code, reason, method, body)| {
            let fields = common_fields(method, body.len());
            (Just(Start::Response { code, reason }), fields, Just(body)).prop_map(
                |(start, fields, body)| Generated {
                    start,
                    fields,
                    body,
                },
            )
        })
        .boxed()
}

fn message() -> BoxedStrategy<Generated> {
    prop_oneof![request(), response()].boxed()
}

// ----- checks -----------------------------------------------------------------------------

fn host_text(h: &Host<'_>) -> String {
    h.to_string()
}

fn check_sip_uri(got: &moonroute::sip::SipUri<'_>, want: &SipUriParts) {
    assert_eq!(got.secure, want.scheme.eq_ignore_ascii_case("sips"));
    assert_eq!(got.user, want.user.as_deref().map(str::as_bytes));
    assert_eq!(got.password, None);
    assert_eq!(host_text(&got.host), want.host);
    assert_eq!(got.port, want.port);
    assert_eq!(got.params.raw(), want.params.as_bytes());
    assert_eq!(got.headers, None);
    assert_eq!(got.raw(), want.render().as_bytes());
}

fn check_uri(got: &Uri<'_>, want: &UriParts) {
    match (got, want) {
        (Uri::Sip(s), UriParts::Sip(w)) => check_sip_uri(s, w),
        (Uri::Tel(t), UriParts::Tel { number, params }) => {
            assert_eq!(t.number, number.as_bytes());
            assert_eq!(t.params.raw(), params.as_bytes());
        }
        _ => panic!("URI {got:?} is not the generated {want:?}"),
    }
}

fn check_via(got: &Via<'_>, want: &ViaParts) {
    assert_eq!(got.protocol, b"SIP");
    assert_eq!(got.version, b"2.0");
    assert_eq!(got.transport, want.transport.as_bytes());
    assert_eq!(host_text(&got.host), want.host);
    assert_eq!(got.port, want.port);
    assert_eq!(got.branch(), Some(want.branch.as_bytes()));
    assert!(got.is_rfc3261_branch());
}

fn check_name_addr(got: &moonroute::sip::NameAddr<'_>, want: &NameAddrParts) {
    assert_eq!(got.display, want.display.as_deref().map(str::as_bytes));
    check_uri(&got.uri, &want.uri);
    assert_eq!(got.tag(), want.tag.as_deref().map(str::as_bytes));
    assert!(got.angle);
}

/// Every typed accessor reports what was generated.
fn check_typed(m: &Message, g: &Generated) {
    match &g.start {
        Start::Request { method, uri } => {
            assert!(m.is_request());
            assert_eq!(m.method().unwrap().as_str(), method);
            assert_eq!(m.request_uri_bytes(), Some(uri.render().as_bytes()));
            check_uri(&m.request_uri().unwrap(), uri);
        }
        Start::Response { code, reason } => {
            assert!(m.is_response());
            assert_eq!(m.status(), Some(*code));
            assert_eq!(m.reason(), Some(reason.as_bytes()));
        }
    }
    assert_eq!(m.start_line(), g.start_line().as_bytes());
    assert_eq!(m.header_count(), g.fields.len());
    for (h, f) in m.headers().zip(&g.fields) {
        assert_eq!(h.text, f.line.as_bytes());
        assert_eq!(h.raw_name, f.name.as_bytes());
        if let FieldKind::Unknown(value) = &f.kind {
            assert_eq!(h.name, HeaderName::Other);
            assert_eq!(h.value, value.as_bytes());
        }
    }

    let want_vias = g.vias();
    let got_vias: Vec<Via<'_>> = m.vias().map(Result::unwrap).collect();
    assert_eq!(got_vias.len(), want_vias.len());
    for (got, want) in got_vias.iter().zip(&want_vias) {
        check_via(got, want);
        assert_eq!(got.rport(), want.rport.then_some(None));
    }
    check_via(&m.top_via().unwrap(), want_vias[0]);

    let mut contacts = m.contacts().map(Result::unwrap);
    let mut record_routes = m.record_routes().map(Result::unwrap);
    for f in &g.fields {
        match &f.kind {
            FieldKind::From(a) => check_name_addr(&m.from().unwrap(), a),
            FieldKind::To(a) => check_name_addr(&m.to().unwrap(), a),
            FieldKind::CallId(c) => assert_eq!(m.call_id().unwrap(), c.as_bytes()),
            FieldKind::CSeq(n, method) => {
                let cseq = m.cseq().unwrap();
                assert_eq!(cseq.seq, *n);
                assert_eq!(cseq.method.as_str(), method);
            }
            FieldKind::MaxForwards(n) => assert_eq!(m.max_forwards().unwrap().unwrap(), *n),
            FieldKind::Expires(n) => assert_eq!(m.expires(), Some(*n)),
            FieldKind::Contact(c) => {
                let got = contacts.next().expect("a Contact per generated one");
                let Contact::Addr(a) = got else {
                    panic!("generated Contact read as *")
                };
                assert_eq!(a.display, c.display.as_deref().map(str::as_bytes));
                check_sip_uri(a.uri.as_sip().unwrap(), &c.uri);
                assert_eq!(got.expires().map(Result::unwrap), c.expires);
                assert_eq!(got.q().map(Result::unwrap), c.q.map(|(_, t)| t));
                let instance = c.instance.as_ref().map(|i| format!("\"<urn:uuid:{i}>\""));
                assert_eq!(
                    a.params.value("+sip.instance"),
                    instance.as_deref().map(str::as_bytes)
                );
            }
            FieldKind::RecordRoute(h) => {
                let got = record_routes
                    .next()
                    .expect("a Record-Route per generated one");
                let uri = got.uri.as_sip().unwrap();
                assert_eq!(host_text(&uri.host), *h);
                assert!(uri.has_lr());
            }
            _ => {}
        }
    }
    assert!(contacts.next().is_none());
    assert!(record_routes.next().is_none());
    if !g
        .fields
        .iter()
        .any(|f| matches!(f.kind, FieldKind::MaxForwards(_)))
    {
        assert!(m.max_forwards().is_none());
    }
    if !g
        .fields
        .iter()
        .any(|f| matches!(f.kind, FieldKind::Expires(_)))
    {
        assert_eq!(m.expires(), None);
    }
    assert_eq!(m.body().as_ref(), &g.body[..]);
}

const PEER: &str = "127.0.0.1:5060";
const OUR_VIA: &str = "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKproxy1";
const OUR_RR: &str = "<sip:127.0.0.1:5070;lr>";
const NEXT_HOP: &str = "sip:bob@127.0.0.1:5062";

/// What a header line must look like after the edits.
#[derive(Debug)]
enum Want {
    Line(String),
    /// The top Via with `received` (and `rport`) recorded; checked by value.
    Stamped(ViaParts),
}

fn is_via(f: &Field) -> bool {
    matches!(f.kind, FieldKind::Via(_))
}

/// The edits of RFC 3261 §16.6 and §18.2.1 on a request, then a check of the re-parsed result
/// against a model of where each edit lands.
fn check_proxy_request(mut m: Message, g: &Generated) {
    let Start::Request { method, .. } = &g.start else {
        unreachable!()
    };
    // (is Via, is Record-Route, is Max-Forwards, expected line)
    let mut want: Vec<(bool, bool, bool, Want)> = g
        .fields
        .iter()
        .map(|f| {
            (
                is_via(f),
                matches!(f.kind, FieldKind::RecordRoute(_)),
                matches!(f.kind, FieldKind::MaxForwards(_)),
                Want::Line(f.line.clone()),
            )
        })
        .collect();

    let top = g.fields.iter().position(is_via).unwrap();
    let FieldKind::Via(top_via) = &g.fields[top].kind else {
        unreachable!()
    };
    let peer: SocketAddr = PEER.parse().unwrap();
    let stamped = m.stamp_received(peer).unwrap();
    assert_eq!(stamped, top_via.rport || top_via.host != "127.0.0.1");
    if stamped {
        want[top].3 = Want::Stamped(top_via.clone());
    }

    m.prepend_header("Via", OUR_VIA.as_bytes()).unwrap();
    want.insert(
        top,
        (true, false, false, Want::Line(format!("Via: {OUR_VIA}"))),
    );

    m.prepend_header("Record-Route", OUR_RR.as_bytes()).unwrap();
    let rr_at = want.iter().position(|w| w.1).unwrap_or(0);
    want.insert(
        rr_at,
        (
            false,
            true,
            false,
            Want::Line(format!("Record-Route: {OUR_RR}")),
        ),
    );

    let mf = match m.max_forwards() {
        Some(Ok(n)) => n.saturating_sub(1),
        None => 70,
        Some(Err(e)) => panic!("generated Max-Forwards refused: {e}"),
    };
    m.set_header("Max-Forwards", mf.to_string().as_bytes())
        .unwrap();
    let mf_line = Want::Line(format!("Max-Forwards: {mf}"));
    match want.iter().position(|w| w.2) {
        Some(at) => want[at].3 = mf_line,
        None => want.push((false, false, true, mf_line)),
    }

    m.set_request_uri(NEXT_HOP.as_bytes()).unwrap();

    let wire = m.to_bytes();
    let mut written = BytesMut::new();
    m.write_to(&mut written);
    assert_eq!(written.as_ref(), wire.as_ref());

    let r = Message::parse(wire.clone()).expect("edited request re-parses");
    r.validate().expect("edited request validates");
    assert_eq!(r.to_bytes(), wire);
    assert_eq!(
        r.start_line(),
        format!("{method} {NEXT_HOP} SIP/2.0").as_bytes()
    );
    assert_eq!(r.request_uri_bytes(), Some(NEXT_HOP.as_bytes()));
    assert_eq!(r.method().unwrap().as_str(), method);
    assert_eq!(r.top_via().unwrap().raw(), OUR_VIA.as_bytes());
    assert_eq!(r.vias().count(), g.vias().len() + 1);
    assert_eq!(r.max_forwards().unwrap().unwrap(), mf);
    assert_eq!(r.header(HeaderName::RecordRoute), Some(OUR_RR.as_bytes()));
    assert_eq!(r.body().as_ref(), &g.body[..]);
    check_headers(&r, &want.into_iter().map(|w| w.3).collect::<Vec<_>>());
}

/// A response going upstream loses its top Via value (§16.7 step 3); nothing else changes.
fn check_proxy_response(mut m: Message, g: &Generated) {
    let mut want: Vec<Want> = g
        .fields
        .iter()
        .map(|f| Want::Line(f.line.clone()))
        .collect();
    want.remove(g.fields.iter().position(is_via).unwrap());
    assert_eq!(m.remove_first_value(HeaderName::Via), Ok(true));
    let wire = m.to_bytes();
    let r = Message::parse(wire.clone()).expect("edited response re-parses");
    assert_eq!(r.to_bytes(), wire);
    assert_eq!(r.start_line(), g.start_line().as_bytes());
    let vias = g.vias();
    let got: Vec<Via<'_>> = r.vias().map(Result::unwrap).collect();
    assert_eq!(got.len(), vias.len() - 1);
    for (got, want) in got.iter().zip(&vias[1..]) {
        check_via(got, want);
    }
    if !got.is_empty() {
        r.validate().expect("edited response validates");
    }
    assert_eq!(r.body().as_ref(), &g.body[..]);
    check_headers(&r, &want);
}

fn check_headers(r: &Message, want: &[Want]) {
    let got: Vec<_> = r.headers().collect();
    assert_eq!(got.len(), want.len(), "header count after edits");
    for (h, w) in got.iter().zip(want) {
        match w {
            Want::Line(line) => assert_eq!(
                String::from_utf8_lossy(h.text),
                *line,
                "header changed or moved by the edits"
            ),
            Want::Stamped(v) => {
                assert_eq!(h.name, HeaderName::Via);
                let via = Via::parse(h.value).unwrap();
                check_via(&via, v);
                assert_eq!(via.received(), Some(&b"127.0.0.1"[..]));
                assert_eq!(via.rport(), v.rport.then_some(Some(5060)));
            }
        }
    }
}

/// Everything the server may do with a message that parsed; only panics matter here, plus the
/// guarantee that an unedited message reads back as itself.
fn exercise(data: &[u8]) {
    let _ = Message::salvage_request(Bytes::copy_from_slice(data));
    let Ok(mut m) = Message::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let valid = m.validate().is_ok();
    let _ = (m.method(), m.status(), m.reason(), m.start_line());
    let _ = m.request_uri();
    for v in m.vias().flatten() {
        let _ = (v.branch(), v.received(), v.rport(), v.maddr());
        let _ = v.with_received(PEER.parse().unwrap());
    }
    for a in [m.from(), m.to()].into_iter().flatten() {
        let _ = (a.tag(), a.display_name());
    }
    let _ = (m.call_id(), m.cseq(), m.max_forwards(), m.expires());
    for c in m.contacts().flatten() {
        let _ = (c.expires(), c.q());
    }
    let _ = m.routes().chain(m.record_routes()).chain(m.paths()).count();
    let _ = m.option_tags(HeaderName::Require).count();
    for h in m.headers() {
        let _ = h.is("Via");
    }

    let wire = m.to_bytes();
    let again = Message::parse(wire.clone()).expect("unedited message re-parses");
    assert_eq!(again.to_bytes(), wire);
    assert_eq!(again.validate().is_ok(), valid);
    let mut out = BytesMut::new();
    m.write_to(&mut out);

    let _ = m.stamp_received(PEER.parse().unwrap());
    let _ = m.prepend_header("Via", OUR_VIA.as_bytes());
    let _ = m.prepend_header("Record-Route", OUR_RR.as_bytes());
    let _ = m.set_header("Max-Forwards", b"69");
    let _ = m.set_request_uri(NEXT_HOP.as_bytes());
    let _ = m.remove_first_value(HeaderName::Via);
    if let Ok(r) = Message::parse(m.to_bytes()) {
        let _ = r.validate();
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<Index>().prop_map(Mutation::Truncate),
        (
            any::<Index>(),
            vec(
                prop_oneof![
                    any::<u8>(),
                    select(&[b'\r', b'\n', b' ', b':', b';', b',', b'"', b'<', b'>', b'\\'][..])
                ],
                1..8
            )
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
    .boxed()
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    if data.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, x) => {
            let i = i.index(data.len());
            data[i] ^= x;
        }
        Mutation::Truncate(i) => data.truncate(i.index(data.len())),
        Mutation::Insert(i, bytes) => {
            let i = i.index(data.len() + 1);
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let i = i.index(data.len());
            let end = (i + n).min(data.len());
            data.drain(i..end);
        }
    }
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(160))]

    #[test]
    fn generated_messages_round_trip(g in message()) {
        let data = g.render();
        let m = Message::parse(Bytes::from(data.clone()))
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&data)));
        m.validate().unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&data)));
        let wire = m.to_bytes();
        prop_assert_eq!(wire.as_ref(), &data[..]);
        let mut out = BytesMut::new();
        m.write_to(&mut out);
        prop_assert_eq!(out.as_ref(), &data[..]);
        check_typed(&m, &g);
        if m.is_request() {
            check_proxy_request(m, &g);
        } else {
            check_proxy_response(m, &g);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..1024)) {
        exercise(&data);
    }

    #[test]
    fn mutated_messages_never_panic(g in message(), muts in vec(mutation(), 1..6)) {
        let mut data = g.render();
        for m in &muts {
            apply(&mut data, m);
        }
        exercise(&data);
    }
}
