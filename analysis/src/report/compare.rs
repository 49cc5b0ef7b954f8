//! The side-by-side view (`migmon report --format compare`): one column per migration, the figures that answer the
//! question in rows, then the abort arithmetic of the client's TCP settings. `./x demo` prints it for its live and
//! quick migrations.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use super::rel;
use crate::{
    correlate::{AbortReason, Analysis, Basis, ConnectionVerdict, Fate, MigrationReport, fmt_dur},
    trace::FourTuple,
    whatif::{Outage, Prediction, Settings, predict},
};

fn fig(f: Option<&crate::correlate::Figure>) -> String {
    f.map_or_else(|| "–".to_owned(), |f| format!("{} [{}]", fmt_dur(f.ns), f.source))
}

fn rows(m: &MigrationReport) -> Vec<(&'static str, String)> {
    let tl = &m.timeline;
    let anchor = super::anchor_of(m);
    let announce = match (&tl.first_rarp, &tl.first_garp, &tl.first_na) {
        (Some(r), _, _) => format!("RARP {} at {}", rel(r.ts_ns, anchor), r.port),
        (None, Some(g), _) => format!("GARP {} at {}", rel(g.ts_ns, anchor), g.port),
        (None, None, Some(n)) => format!("NA {} at {}", rel(n.ts_ns, anchor), n.port),
        (None, None, None) => "not seen".to_owned(),
    };
    let fdb = if tl.fdb_moves.is_empty() {
        "no".to_owned()
    } else {
        let last = tl.fdb_moves.iter().map(|f| f.ts_ns).max().unwrap_or(anchor);
        format!("{} bridge(s), last {}", tl.fdb_moves.len(), rel(last, anchor))
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for c in m.connections.iter().filter(|c| !c.opened_during_window) {
        if let Fate::Aborted { reason, .. } = c.fate {
            *reasons.entry(reason.to_string()).or_default() += 1;
        }
    }
    let reasons = if reasons.is_empty() {
        "–".to_owned()
    } else {
        reasons
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut tails: Vec<u64> = m.connections.iter().filter_map(|c| c.recovery_tail_ns).collect();
    tails.sort_unstable();
    let tails = match tails.last() {
        Some(max) => format!(
            "{} median, {} max",
            fmt_dur(tails[tails.len() / 2]),
            fmt_dur(*max)
        ),
        None => "–".to_owned(),
    };
    vec![
        ("mode", m.mode.clone().unwrap_or_else(|| "?".into())),
        ("outcome", m.outcome.clone()),
        ("vCPU pause", fig(m.downtime.vcpu_pause.as_ref())),
        ("network blackout", fig(m.downtime.blackout.as_ref())),
        ("convergence", fig(m.downtime.convergence.as_ref())),
        ("announce seen", announce),
        ("FDB moved", fdb),
        ("sessions survived", m.survived.to_string()),
        ("sessions aborted", m.aborted.to_string()),
        ("abort reasons", reasons),
        ("recovery tails", tails),
        ("retransmits", m.retransmits.to_string()),
    ]
}

/// Which client connections a group of TCP settings applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSelector {
    /// Every connection from this client address.
    Addr(IpAddr),
    /// Every connection from a client address in this prefix (`IP/LEN`).
    Prefix(IpAddr, u8),
    /// The connection from this client socket (`IP:PORT`, `[IPv6]:PORT`).
    Socket(SocketAddr),
}

impl ClientSelector {
    fn matches(&self, t: &FourTuple) -> bool {
        match *self {
            Self::Addr(a) => t.saddr == a,
            Self::Socket(s) => t.saddr == s.ip() && t.sport == s.port(),
            Self::Prefix(p, len) => match (p, t.saddr) {
                (IpAddr::V4(p), IpAddr::V4(a)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                    u32::from(p) & mask == u32::from(a) & mask
                }
                (IpAddr::V6(p), IpAddr::V6(a)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                    u128::from(p) & mask == u128::from(a) & mask
                }
                _ => false,
            },
        }
    }
}

impl fmt::Display for ClientSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Prefix(a, len) => write!(f, "{a}/{len}"),
            Self::Socket(s) => write!(f, "{s}"),
        }
    }
}

/// A `--client-tcp` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientTcpError {
    #[error("{input:?}: expected CLIENTS=SETTINGS, for example 10.0.0.0/24=tcp-retries2=3,rto-min=80ms")]
    Form { input: String },
    #[error(
        "{input:?} is not a client: write an address (10.0.0.2), a prefix (10.0.0.0/24) or a socket (10.0.0.2:40000, \
         [fd00::2]:40000)"
    )]
    Client { input: String },
    #[error(
        "{input:?} is not a TCP setting: write tcp-retries2=N, rto-min=DURATION, user-timeout=DURATION or windows"
    )]
    Setting { input: String },
    #[error("{input:?}: {source}")]
    Value {
        input: String,
        #[source]
        source: migmon_base::units::UnitError,
    },
}

impl FromStr for ClientSelector {
    type Err = ClientTcpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ClientTcpError::Client { input: s.to_owned() };
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(Self::Addr(a));
        }
        if let Ok(sock) = s.parse::<SocketAddr>() {
            return Ok(Self::Socket(sock));
        }
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Self::Prefix(addr, len))
    }
}

/// TCP settings for some of the clients (`--client-tcp CLIENTS=SETTINGS`): `CLIENTS` is a comma-separated list of
/// [`ClientSelector`]s, `SETTINGS` a comma-separated list of `tcp-retries2=N`, `rto-min=D`, `user-timeout=D` and
/// `windows`, over Linux's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTcp {
    pub clients: Vec<ClientSelector>,
    pub settings: Settings,
}

impl FromStr for ClientTcp {
    type Err = ClientTcpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (clients, settings) = s
            .split_once('=')
            .ok_or_else(|| ClientTcpError::Form { input: s.to_owned() })?;
        let clients = clients
            .split(',')
            .map(|c| c.trim().parse())
            .collect::<Result<Vec<ClientSelector>, _>>()?;
        let mut st = Settings::default();
        for item in settings.split(',').map(str::trim) {
            let setting = || ClientTcpError::Setting {
                input: item.to_owned(),
            };
            let value = |source| ClientTcpError::Value {
                input: item.to_owned(),
                source,
            };
            let duration = |v: &str| {
                migmon_base::units::parse_duration(v)
                    .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                    .map_err(value)
            };
            match item.split_once('=') {
                None if item == "windows" => st.windows = true,
                Some(("tcp-retries2", v)) => st.tcp_retries2 = v.parse().map_err(|_| setting())?,
                Some(("rto-min", v)) => st.rto_min_ns = duration(v)?,
                Some(("user-timeout", v)) => st.user_timeout_ns = Some(duration(v)?),
                _ => return Err(setting()),
            }
        }
        Ok(Self {
            clients,
            settings: st,
        })
    }
}

/// The clients' TCP settings: those of `groups` for the connections they select (the first that matches), the
/// default for the others.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientSettings {
    pub default: Settings,
    pub groups: Vec<ClientTcp>,
}

impl From<Settings> for ClientSettings {
    /// The same settings for every client.
    fn from(default: Settings) -> Self {
        Self {
            default,
            groups: Vec::new(),
        }
    }
}

impl ClientSettings {
    /// The index of the group whose settings apply to `t` (`None`: the default).
    fn group_of(&self, t: &FourTuple) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.clients.iter().any(|c| c.matches(t)))
    }

    fn settings(&self, group: Option<usize>) -> &Settings {
        group.map_or(&self.default, |i| &self.groups[i].settings)
    }
}

fn outage(restore_ns: u64, base_rto_ns: u64, carried: bool) -> Outage {
    Outage {
        t0_ns: 0,
        restore_ns,
        base_rto_ns,
        carried,
    }
}

/// How long a connection that loses a segment keeps retransmitting before it aborts, under `s` (the segment sent
/// at 0, a base RTO of `rto_min`).
pub fn abort_after_ns(s: &Settings) -> u64 {
    abort_after_at_ns(s, s.rto_min_ns)
}

/// The same from a base RTO of `base_rto_ns`.
fn abort_after_at_ns(s: &Settings, base_rto_ns: u64) -> u64 {
    match predict(&outage(u64::MAX, base_rto_ns, false), s, s.rto_min_ns) {
        Prediction::Aborts { at_ns, .. } => at_ns,
        _ => u64::MAX,
    }
}

/// The longest outage a connection survives under `s`: the time of its last retransmission before the abort.
pub fn longest_survivable_ns(s: &Settings) -> u64 {
    longest_survivable_at_ns(s, s.rto_min_ns)
}

/// The same from a base RTO of `base_rto_ns`.
fn longest_survivable_at_ns(s: &Settings, base_rto_ns: u64) -> u64 {
    let Prediction::Aborts { retransmits, .. } =
        predict(&outage(u64::MAX, base_rto_ns, false), s, s.rto_min_ns)
    else {
        return u64::MAX;
    };
    // The k-th retransmission is the first that can get through an outage ending just before it.
    let mut lo = 0u64;
    let mut hi = abort_after_at_ns(s, base_rto_ns);
    while lo + 1_000_000 < hi {
        let mid = lo + (hi - lo) / 2;
        match predict(&outage(mid, base_rto_ns, false), s, s.rto_min_ns) {
            Prediction::Survives { retransmits: k, .. } if k <= retransmits => lo = mid,
            _ => hi = mid,
        }
    }
    lo
}

/// The judged connections of one migration that share their TCP settings and, within 30 %, their RTO.
struct Group<'a> {
    settings: Option<usize>,
    /// The median RTO before backoff, and what gave it; `None`: none of them retransmitted.
    rto: Option<(u64, Basis)>,
    connections: Vec<&'a ConnectionVerdict>,
}

fn groups<'a>(m: &'a MigrationReport, tcp: &ClientSettings) -> Vec<Group<'a>> {
    let mut by: BTreeMap<(Option<usize>, bool), Vec<&ConnectionVerdict>> = BTreeMap::new();
    for c in m.connections.iter().filter(|c| !c.opened_during_window) {
        by.entry((tcp.group_of(&c.tuple), c.base_rto_us.is_some()))
            .or_default()
            .push(c);
    }
    let mut out = Vec::new();
    for ((settings, with_rto), mut cs) in by {
        if !with_rto {
            out.push(Group {
                settings,
                rto: None,
                connections: cs,
            });
            continue;
        }
        cs.sort_by_key(|c| c.base_rto_us);
        let mut i = 0;
        while i < cs.len() {
            let first = cs[i].base_rto_us.unwrap_or(0);
            let n = cs[i..]
                .iter()
                .take_while(|c| c.base_rto_us.unwrap_or(0) as f64 <= first as f64 * 1.3)
                .count();
            let members: Vec<&ConnectionVerdict> = cs[i..i + n].to_vec();
            let median = members[members.len() / 2];
            out.push(Group {
                settings,
                rto: median
                    .base_rto_us
                    .map(|us| (us.saturating_mul(1000), median.basis)),
                connections: members,
            });
            i += n;
        }
    }
    out
}

/// The abort arithmetic of settings `st`, for a base RTO of `base`.
fn arithmetic(st: &Settings, base: u64) -> String {
    let abort = abort_after_at_ns(st, base);
    let longest = longest_survivable_at_ns(st, base);
    format!(
        "a connection that loses a segment retransmits for the last time {} after the loss and aborts with \
         ETIMEDOUT at {}; where the hypervisor drops the frames sent during the pause (QEMU) an outage longer than {} \
         kills it, where it carries them to the guest at resume (our migrator) one that ends before {} does not",
        fmt_dur(longest),
        fmt_dur(abort),
        fmt_dur(longest),
        fmt_dur(abort)
    )
}

/// What the settings `st` predict for migration `m`'s outage, at a base RTO of `base`; `None` when nothing was
/// lost.
fn predicted(m: &MigrationReport, st: &Settings, base: u64) -> Option<(String, bool)> {
    let (Some(p), Some(r)) = (&m.timeline.pause, &m.timeline.resume) else {
        return None;
    };
    let abort = abort_after_at_ns(st, base);
    let longest = longest_survivable_at_ns(st, base);
    // A segment sent as the VM stops: the network is back at resume (and the last FDB move).
    let restore = crate::whatif::restore_ns(m).saturating_sub(p.ts_ns);
    let prediction = predict(&outage(restore, base, m.carries_frames), st, st.rto_min_ns);
    let text = match prediction {
        Prediction::Aborts { .. } if m.carries_frames => format!(
            "outage {} ≥ abort at {}: every connection sending during the pause aborts before resume, although the \
             migrator carries the frames held during the pause",
            fmt_dur(restore),
            fmt_dur(abort)
        ),
        Prediction::Aborts { .. } => format!(
            "outage {} > {}: every connection sending during the pause aborts",
            fmt_dur(restore),
            fmt_dur(longest)
        ),
        Prediction::Survives { at_ns, .. } => format!(
            "outage {} ≤ {}: connections survive; one that lost a segment at the pause heals at its retransmission \
             {} after the pause ({} after resume)",
            fmt_dur(restore),
            fmt_dur(longest),
            fmt_dur(at_ns),
            fmt_dur(at_ns.saturating_sub(r.ts_ns.saturating_sub(p.ts_ns)))
        ),
        Prediction::Delivered { .. } => format!(
            "outage {} < abort at {}: connections survive: the migrator carried the retransmissions held during the \
             pause to the guest at resume{}",
            fmt_dur(restore),
            fmt_dur(abort),
            if restore > longest {
                format!(
                    " (with frames dropped, as under QEMU, an outage over {} would kill them)",
                    fmt_dur(longest)
                )
            } else {
                String::new()
            }
        ),
        Prediction::Unaffected => return None,
    };
    Some((text, !prediction.survives()))
}

/// What a group's connections did, and whether the arithmetic's prediction (`aborts`) holds for the ones that
/// were sending during the pause.
fn seen(g: &Group<'_>, aborts: bool) -> String {
    let timed_out = g
        .connections
        .iter()
        .filter(|c| {
            matches!(
                c.fate,
                Fate::Aborted {
                    reason: AbortReason::Etimedout,
                    ..
                }
            )
        })
        .count();
    let sending: Vec<&&ConnectionVerdict> = g.connections.iter().filter(|c| c.retransmits > 0).collect();
    if sending.is_empty() {
        return "seen: none was sending during the pause".to_owned();
    }
    let survived = sending.iter().filter(|c| c.fate == Fate::Survived).count();
    let mut out = format!(
        "seen: {survived} of {} sending survived, {timed_out} timed out",
        sending.len()
    );
    if (aborts && survived > 0) || (!aborts && timed_out > 0) {
        out.push_str(": NOT what these settings predict (are these clients' settings others?)");
    }
    out
}

/// Renders the comparison; `tcp` (the clients' TCP settings, when known) adds the abort arithmetic, per group of
/// connections that share their settings and their RTO (the sockets', else the one the wire inferred).
pub fn render(a: &Analysis, tcp: Option<&ClientSettings>) -> String {
    let mut s = String::new();
    for n in &a.in_progress {
        let _ = writeln!(s, "IN PROGRESS: {n}");
    }
    for w in &a.warnings {
        let _ = writeln!(s, "WARNING: {w}");
    }
    if a.migrations.is_empty() {
        s.push_str("no migration in this trace\n");
        return s;
    }
    let cols: Vec<Vec<(&str, String)>> = a.migrations.iter().map(rows).collect();
    let width = cols
        .iter()
        .flat_map(|c| c.iter().map(|(_, v)| v.chars().count()))
        .max()
        .unwrap_or(10)
        .clamp(12, 44);
    let _ = write!(s, "{:<20}", "");
    for m in &a.migrations {
        let _ = write!(s, "  {:<width$}", m.id);
    }
    s.push('\n');
    for (i, (label, _)) in cols[0].iter().enumerate() {
        let _ = write!(s, "{label:<20}");
        for c in &cols {
            let v: String = c[i].1.chars().take(width).collect();
            let _ = write!(s, "  {v:<width$}");
        }
        s.push('\n');
    }
    let Some(tcp) = tcp else {
        return s;
    };
    let _ = writeln!(s);
    let name = |g: Option<usize>| match g {
        None if tcp.groups.is_empty() => String::new(),
        None => " (the other clients)".to_owned(),
        Some(i) => {
            let list: Vec<String> = tcp.groups[i].clients.iter().map(ToString::to_string).collect();
            format!(" ({})", list.join(", "))
        }
    };
    for g in std::iter::once(None).chain((0..tcp.groups.len()).map(Some)) {
        let st = tcp.settings(g);
        let _ = writeln!(
            s,
            "client TCP{}: {st}: {}",
            name(g),
            arithmetic(st, st.rto_min_ns)
        );
    }
    for m in &a.migrations {
        let gs = groups(m, tcp);
        if gs.is_empty() {
            if let Some((text, _)) = predicted(m, &tcp.default, tcp.default.rto_min_ns) {
                let _ = writeln!(s, "  {}: {text}", m.id);
            }
            continue;
        }
        for g in &gs {
            let st = tcp.settings(g.settings);
            let base = g.rto.map_or(st.rto_min_ns, |(ns, _)| ns);
            let Some((text, aborts)) = predicted(m, st, base) else {
                continue;
            };
            let rto = match g.rto {
                Some((ns, basis)) => format!(
                    ", RTO {} [{basis}] (last retransmission {} after the loss, ETIMEDOUT at {})",
                    fmt_dur(ns),
                    fmt_dur(longest_survivable_at_ns(st, ns)),
                    fmt_dur(abort_after_at_ns(st, ns))
                ),
                None => format!(
                    ", no retransmission (RTO taken as rto_min {})",
                    fmt_dur(st.rto_min_ns)
                ),
            };
            let _ = writeln!(
                s,
                "  {}: {} connection(s){}{rto}: {text}; {}",
                m.id,
                g.connections.len(),
                name(g.settings),
                seen(g, aborts)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        correlate::correlate,
        fixtures::{live_trace, quick_trace},
    };

    #[test]
    fn side_by_side_with_arithmetic() {
        let mut ev = live_trace();
        ev.extend(quick_trace().into_iter().map(|mut e| {
            if let crate::trace::Event::Migration { ev, .. } = &mut e {
                ev.ts_ns += 100_000_000_000;
            }
            e
        }));
        let a = correlate(&ev);
        let st = Settings {
            tcp_retries2: 3,
            ..Settings::default()
        };
        // 3.0 s counted from the first RTO retransmission (0.2 s), at the next timer: 0.2·(2^5 − 1) = 6.2 s.
        assert_eq!(abort_after_ns(&st), 6_200_000_000);
        let out = render(&a, Some(&st.into()));
        assert!(out.lines().next().unwrap().contains("live-1"), "{out}");
        assert!(out.contains("sessions aborted"), "{out}");
        // Its last retransmission goes out at 0.2·(2^4 − 1) = 3.0 s: a longer outage kills it.
        assert!(longest_survivable_ns(&st).abs_diff(3_000_000_000) <= 1_000_000);
        assert!(
            out.contains(
                "live-1: 6 connection(s), RTO 200.0 ms [sockets] (last retransmission 3.00 s after the loss, \
                 ETIMEDOUT at 6.20 s): outage 7.0 ms ≤ 3.00 s: connections survive"
            ),
            "{out}"
        );
        assert!(
            out.contains("heals at its retransmission 200.0 ms after the pause (195.0 ms after resume)"),
            "{out}"
        );
        assert!(
            out.contains("outage 8.00 s > 3.00 s: every connection sending during the pause aborts"),
            "{out}"
        );
    }

    /// The same 8 s quick pause under `tcp_retries2=4` (last retransmission 6.2 s, abort 12.6 s): QEMU-style dropped
    /// frames kill every connection, our migrator's carried frames save them, and the Setup event says which.
    #[test]
    fn carried_frames_change_the_verdict() {
        let st = Settings {
            tcp_retries2: 4,
            ..Settings::default()
        };
        let dropped = correlate(&quick_trace());
        assert!(!dropped.migrations[0].carries_frames);
        let out = render(&dropped, Some(&st.into()));
        assert!(
            out.contains("outage 8.00 s > 6.20 s: every connection sending during the pause aborts"),
            "{out}"
        );
        let carried: Vec<_> = quick_trace()
            .into_iter()
            .map(|mut e| {
                if let crate::trace::Event::Migration { ev, .. } = &mut e
                    && let migevents::Phase::Setup { carries_frames, .. } = &mut ev.phase
                {
                    *carries_frames = true;
                }
                e
            })
            .collect();
        let carried = correlate(&carried);
        assert!(carried.migrations[0].carries_frames);
        let out = render(&carried, Some(&st.into()));
        assert!(
            out.contains(
                "outage 8.00 s < abort at 12.60 s: connections survive: the migrator carried the retransmissions \
                 held during the pause to the guest at resume"
            ),
            "{out}"
        );
        // Under tcp_retries2=3 (abort 6.2 s) carrying is not enough.
        let st3 = Settings {
            tcp_retries2: 3,
            ..Settings::default()
        };
        assert!(
            render(&carried, Some(&st3.into())).contains("outage 8.00 s ≥ abort at 6.20 s"),
            "{out}"
        );
    }

    /// A run with two client profiles: a Linux client the sockets saw (RTO 200 ms, `tcp_retries2` 15) and a
    /// windows-2003 style one only the wire saw (RTO 86 ms, `tcp_retries2` 3), across a 6 s quick pause with frames
    /// dropped. Each group gets the arithmetic of its own settings and RTO; with one set of settings for both, the
    /// line of the group they do not fit says so.
    #[test]
    fn each_group_of_clients_gets_its_own_arithmetic() {
        use crate::{
            fixtures::{
                FlowSeg, VM_IP, VM_MAC, flow_open, flow_rst, flow_rtx, migration, note, rtx, state, tuple,
            },
            trace::FlowSide::Peer,
        };
        let linux = tuple(40001, VM_IP);
        let mut ev = migration("q1", VM_MAC, VM_IP, migevents::Mode::Quick, 1000, 7000);
        ev.push(state(50, linux, "SYN_SENT", "ESTABLISHED"));
        for (k, t) in [1200, 1600, 2400, 4000, 7200].into_iter().enumerate() {
            ev.push(rtx(t, linux, k as u32 + 1, 200));
        }
        let head = |ms| FlowSeg::data(Peer, 41000, 1000, 100).silence(ms);
        ev.push(flow_open(100, &FlowSeg::data(Peer, 41000, 900, 100), "uplink"));
        ev.push(flow_rtx(1088, &head(88), "uplink"));
        let mut t = 1088;
        for k in 0..5 {
            t += 86 << k;
            ev.push(flow_rtx(t, &head(86 << k), "uplink"));
        }
        ev.push(flow_rst(
            7010,
            &FlowSeg::data(Peer, 41000, 1000, 0).flags(0x04),
            "uplink",
        ));
        ev.push(note(20_000));
        let a = correlate(&ev);
        let windows: ClientTcp = "10.77.0.100:41000=tcp-retries2=3,rto-min=80ms".parse().unwrap();
        let tcp = ClientSettings {
            default: Settings::default(),
            groups: vec![windows],
        };
        let out = render(&a, Some(&tcp));
        assert!(
            out.contains("client TCP (10.77.0.100:41000): tcp_retries2=3 rto_min=80.0 ms: "),
            "{out}"
        );
        let line = |needle: &str| {
            out.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?}:\n{out}"))
                .to_owned()
        };
        let l = line("q1: 1 connection(s) (the other clients), RTO 200.0 ms [sockets]");
        assert!(
            l.contains("connections survive") && l.contains("seen: 1 of 1 sending survived, 0 timed out"),
            "{l}"
        );
        assert!(!l.contains("NOT"), "{l}");
        // 86 ms doubling: the fifth retransmission 2.67 s after the loss, the abort 63 RTOs after it.
        let l = line("q1: 1 connection(s) (10.77.0.100:41000), RTO 86.0 ms [wire]");
        assert!(
            l.contains("(last retransmission 2.67 s after the loss, ETIMEDOUT at 5.42 s)")
                && l.contains("every connection sending during the pause aborts")
                && l.contains("seen: 0 of 1 sending survived, 1 timed out"),
            "{l}"
        );
        assert!(!l.contains("NOT"), "{l}");

        // One set of settings (Linux defaults) for both: the windows client's abort contradicts it, and the line
        // says so.
        let out = render(&a, Some(&Settings::default().into()));
        let l = out
            .lines()
            .find(|l| l.contains("RTO 86.0 ms [wire]"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(l.contains("1 timed out: NOT what these settings predict"), "{l}");
    }

    #[test]
    fn client_tcp_values_parse_or_say_what_is_wrong() {
        let g: ClientTcp = "10.0.0.0/24,[fd00::2]:40000,fd00::3=user-timeout=2s,rto-min=80ms"
            .parse()
            .unwrap();
        assert_eq!(g.clients.len(), 3);
        assert_eq!(g.settings.user_timeout_ns, Some(2_000_000_000));
        assert_eq!(g.settings.rto_min_ns, 80_000_000);
        assert_eq!(g.settings.tcp_retries2, 15);
        let t = |saddr: &str, sport| FourTuple {
            saddr: saddr.parse().unwrap(),
            sport,
            daddr: "10.0.0.9".parse().unwrap(),
            dport: 7,
        };
        assert!(g.clients[0].matches(&t("10.0.0.200", 1)));
        assert!(!g.clients[0].matches(&t("10.0.1.1", 1)));
        assert!(g.clients[1].matches(&t("fd00::2", 40000)));
        assert!(!g.clients[1].matches(&t("fd00::2", 40001)));
        assert!(g.clients[2].matches(&t("fd00::3", 5)));
        let w: ClientTcp = "10.0.0.2=windows".parse().unwrap();
        assert!(w.settings.windows);
        for (bad, says) in [
            ("10.0.0.2", "expected CLIENTS=SETTINGS"),
            ("10.0.0.300=windows", "is not a client"),
            ("10.0.0.0/33=windows", "is not a client"),
            ("10.0.0.2=retries=3", "is not a TCP setting"),
            ("10.0.0.2=rto-min=80", "rto-min=80"),
        ] {
            let e = bad.parse::<ClientTcp>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
