//! `sip.time`: the clock a script sees, and time windows (Kamailio's `tmrec_match` and
//! `time_period_match`) evaluated in an explicit IANA time zone (jiff: DST and the zone's
//! history from the system tzdata, the bundled copy where there is none).
//!
//! The clock is [`Services::now`](crate::script::Services::now): the system clock on a
//! server, the pretended time of an offline run (`moonroute.run{time = ...}`). `os.time()`
//! and `os.date()` without a time argument read the same clock, so a test can pin them.
//!
//! A window is `[DAYS] [HH:MM-HH:MM[,HH:MM-HH:MM...]]`, several joined with `;`:
//! `"Mon-Fri 08:00-18:00"`, `"Sat 09:00-12:00; Sun"`, `"22:00-06:00"`. Days are `Mon`..`Sun`
//! (any case, ranges and lists: `Mon-Wed,Fri`); a range starts at its first minute and ends
//! before its last (`08:00-18:00` holds at 17:59, not at 18:00); a range ending before it
//! starts runs past midnight and belongs to the day it starts on (`Fri 22:00-06:00` holds on
//! Saturday 03:00).

use mlua::{Lua, Table};

use super::{env, runtime};

/// Installs `sip.time.now` and `sip.time.match`, and points `os.time()`/`os.date()` at the
/// engine's clock.
pub fn install(lua: &Lua, sip: &Table) -> mlua::Result<()> {
    let time = lua.create_table()?;
    let now = lua.create_function(|lua, ()| Ok(now_seconds(lua, "sip.time.now")?.as_second()))?;
    time.set("now", now.clone())?;
    time.set(
        "match",
        lua.create_function(|lua, (spec, zone, at): (String, String, Option<i64>)| {
            let at = match at {
                Some(seconds) => jiff::Timestamp::from_second(seconds)
                    .map_err(|e| runtime(format!("sip.time.match: {e}")))?,
                None => now_seconds(lua, "sip.time.match")?,
            };
            let windows = parse(&spec).map_err(|e| runtime(format!("sip.time.match: {e}")))?;
            let zone = jiff::tz::TimeZone::get(&zone).map_err(|_| {
                runtime(format!(
                    "sip.time.match: unknown time zone {zone:?} (an IANA name such as \"Europe/Paris\", or \"UTC\")"
                ))
            })?;
            Ok(matches(&windows, &at.to_zoned_datetime(zone)))
        })?,
    )?;
    sip.set("time", time)?;
    let os: Table = lua.globals().get("os")?;
    lua.load(
        r##"
        local os, now = ...
        local time, date = os.time, os.date
        os.time = function(...)
          if select("#", ...) == 0 or (...) == nil then return now() end
          return time(...)
        end
        os.date = function(format, t, ...)
          if t == nil then t = now() end
          return date(format, t, ...)
        end
        "##,
    )
    .set_name("=os")
    .call::<()>((os, now))
}

fn now_seconds(lua: &Lua, primitive: &str) -> mlua::Result<jiff::Timestamp> {
    let now = env(lua, primitive)?.services.now();
    jiff::Timestamp::try_from(now).map_err(|e| runtime(format!("{primitive}: {e}")))
}

/// One `;`-separated part of a window spec: the days it holds on (bit 0 Monday) and its
/// minute ranges (none: all day).
#[derive(Debug, PartialEq)]
struct Window {
    days: u8,
    ranges: Vec<(u16, u16)>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const ALL_DAYS: u8 = 0x7f;

fn parse(spec: &str) -> Result<Vec<Window>, String> {
    let mut windows = Vec::new();
    for part in spec.split(';').map(str::trim) {
        if part.is_empty() {
            return Err(format!("empty window in {spec:?}"));
        }
        let mut window = Window {
            days: 0,
            ranges: Vec::new(),
        };
        for word in part.split_whitespace() {
            if word.starts_with(|c: char| c.is_ascii_digit()) {
                for range in word.split(',') {
                    window.ranges.push(minute_range(range)?);
                }
            } else {
                for days in word.split(',') {
                    window.days |= day_set(days)?;
                }
            }
        }
        if window.days == 0 {
            window.days = ALL_DAYS;
        }
        windows.push(window);
    }
    Ok(windows)
}

fn day(name: &str) -> Result<u8, String> {
    let lower = name.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| lower.len() >= 3 && lower.starts_with(d))
        .map(|i| i as u8)
        .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, ... Sun)"))
}

fn day_set(text: &str) -> Result<u8, String> {
    match text.split_once('-') {
        None => Ok(1 << day(text)?),
        Some((first, last)) => {
            let (mut d, last) = (day(first)?, day(last)?);
            let mut set = 1 << d;
            while d != last {
                d = (d + 1) % 7;
                set |= 1 << d;
            }
            Ok(set)
        }
    }
}

fn minute_range(text: &str) -> Result<(u16, u16), String> {
    let (start, end) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not a time range (HH:MM-HH:MM)"))?;
    Ok((minute(start)?, minute(end)?))
}

fn minute(text: &str) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time of day (HH:MM)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn matches(windows: &[Window], at: &jiff::ZonedDateTime) -> bool {
    let today = at.weekday().to_monday_zero_offset() as u8;
    let yesterday = (today + 6) % 7;
    let minute = at.hour() as u16 * 60 + at.minute() as u16;
    let on = |days: u8, d: u8| days & (1 << d) != 0;
    windows.iter().any(|w| {
        if w.ranges.is_empty() {
            return on(w.days, today);
        }
        w.ranges.iter().any(|&(start, end)| {
            if start <= end {
                on(w.days, today) && (start..end).contains(&minute)
            } else {
                (on(w.days, today) && minute >= start) || (on(w.days, yesterday) && minute < end)
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, zone: &str) -> jiff::ZonedDateTime {
        let civil: jiff::civil::DateTime = text.parse().unwrap();
        civil.in_tz(zone).unwrap()
    }

    fn holds(spec: &str, when: &str) -> bool {
        matches(&parse(spec).unwrap(), &at(when, "Europe/Paris"))
    }

    #[test]
    fn office_hours() {
        // 2026-12-07 is a Monday.
        assert!(holds("Mon-Fri 08:00-18:00", "2026-12-07T08:00"));
        assert!(holds("Mon-Fri 08:00-18:00", "2026-12-11T17:59"));
        assert!(!holds("Mon-Fri 08:00-18:00", "2026-12-11T18:00"));
        assert!(!holds("Mon-Fri 08:00-18:00", "2026-12-12T10:00"));
        assert!(holds(
            "mon-fri 08:00-12:00,13:00-18:00; sat 09:00-12:00",
            "2026-12-12T09:30"
        ));
        assert!(!holds(
            "Mon-Fri 08:00-12:00,13:00-18:00",
            "2026-12-08T12:30"
        ));
        assert!(holds("Sun", "2026-12-13T23:59"));
        assert!(holds("Fri-Mon", "2026-12-13T12:00"));
        assert!(!holds("Fri-Mon", "2026-12-09T12:00"));
    }

    #[test]
    fn a_range_past_midnight_belongs_to_its_first_day() {
        assert!(holds("Fri 22:00-06:00", "2026-12-11T23:00"));
        assert!(holds("Fri 22:00-06:00", "2026-12-12T03:00"));
        assert!(!holds("Fri 22:00-06:00", "2026-12-11T03:00"));
        assert!(holds("22:00-24:00", "2026-12-11T23:59"));
    }

    #[test]
    fn the_zone_decides_the_hour_dst_included() {
        let windows = parse("Mon-Fri 08:00-18:00").unwrap();
        // 07:30 UTC on a winter Monday is 08:30 in Paris (UTC+1), 07:30 in London.
        let instant: jiff::Timestamp = "2026-12-07T07:30:00Z".parse().unwrap();
        let tz = |z: &str| jiff::tz::TimeZone::get(z).unwrap();
        assert!(matches(
            &windows,
            &instant.to_zoned_datetime(tz("Europe/Paris"))
        ));
        assert!(!matches(
            &windows,
            &instant.to_zoned_datetime(tz("Europe/London"))
        ));
        // In July Paris is UTC+2: 06:30 UTC is 08:30 there.
        let summer: jiff::Timestamp = "2026-07-06T06:30:00Z".parse().unwrap();
        assert!(matches(
            &windows,
            &summer.to_zoned_datetime(tz("Europe/Paris"))
        ));
    }

    #[test]
    fn bad_specs_say_why() {
        assert!(parse("Mon-Fry")
            .unwrap_err()
            .contains("\"Fry\" is not a day"));
        assert!(parse("8-18").unwrap_err().contains("HH:MM"));
        assert!(parse("25:00-26:00").is_err());
        assert!(parse("Mon;").is_err());
    }
}
