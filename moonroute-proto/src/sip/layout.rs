//! Where the parts of a parsed value lie in its text, as offsets: what a [`super::Message`]
//! keeps of the values nearly every layer reads (the top Via, the Request-URI, From, To, the
//! first Contact) so that each is parsed once per message rather than once per reader. A
//! layout is turned back into the borrowed view over the same text by the `rebuild` function
//! of the value's type ([`super::Via`], [`super::Uri`], [`super::NameAddr`]); the caller keeps
//! a layout together with the text it was taken from.

use std::net::IpAddr;

use super::uri::Host;

/// `(start, end)` of a part within the text its value was parsed from.
pub(crate) type Place = (u32, u32);

/// `part`'s place in `base` (of which it is a sub-slice).
pub(crate) fn place(base: &[u8], part: &[u8]) -> Place {
    let start = (part.as_ptr() as usize).saturating_sub(base.as_ptr() as usize);
    (start as u32, (start + part.len()) as u32)
}

/// The part of `base` at `place` (empty if `base` is not the text the place was taken from).
pub(crate) fn at(base: &[u8], (start, end): Place) -> &[u8] {
    base.get(start as usize..end as usize).unwrap_or_default()
}

/// [`place`] of an optional part.
pub(crate) fn place_opt(base: &[u8], part: Option<&[u8]>) -> Option<Place> {
    part.map(|p| place(base, p))
}

/// [`at`] of an optional part.
pub(crate) fn at_opt(base: &[u8], part: Option<Place>) -> Option<&[u8]> {
    part.map(|p| at(base, p))
}

/// A [`Host`]: a name by its place, an address by its value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HostLayout {
    Domain(Place),
    Ip(IpAddr),
}

impl HostLayout {
    pub(crate) fn of(base: &[u8], host: &Host<'_>) -> HostLayout {
        match host {
            Host::Domain(name) => HostLayout::Domain(place(base, name.as_bytes())),
            Host::Ip(ip) => HostLayout::Ip(*ip),
        }
    }

    pub(crate) fn rebuild(self, base: &[u8]) -> Host<'_> {
        match self {
            // A host name is ASCII (checked when parsed).
            HostLayout::Domain(span) => {
                Host::Domain(std::str::from_utf8(at(base, span)).unwrap_or_default())
            }
            HostLayout::Ip(ip) => Host::Ip(ip),
        }
    }
}
