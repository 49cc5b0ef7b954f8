//! The SVG timeline: one panel per migration, with lanes for the vCPU on each host, the migration phases, the wire
//! per port (the VM's frames, announces, black-holed frames), the FDB per bridge, and the connections (retransmit
//! dots, recovery and abort marks). The pause is shaded across every lane.

use std::fmt::Write as _;

use super::{anchor_of, rel};
use crate::correlate::{Analysis, Basis, BlackHole, Fate, MigrationReport, Timeline, fmt_dur};

const WIDTH: f64 = 1200.0;
const LABEL_W: f64 = 250.0;
const RIGHT_PAD: f64 = 30.0;
const LANE_H: f64 = 26.0;
const MAX_CONN_LANES: usize = 24;

const C_RUN: &str = "#4caf50";
const C_PAUSE: &str = "#e53935";
const C_PRECOPY: &str = "#42a5f5";
const C_WIRE: &str = "#7e57c2";
const C_ANNOUNCE: &str = "#ff9800";
const C_FDB: &str = "#26a69a";
const C_ABORT: &str = "#c62828";
const C_OK: &str = "#2e7d32";
const C_GREY: &str = "#9e9e9e";
const C_TEXT: &str = "#212121";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2, 5 × 10^k ns) giving about 8 ticks over `span`.
fn tick_step(span: u64) -> u64 {
    let raw = (span / 8).max(1);
    let mut p = 1u64;
    while p.saturating_mul(10) <= raw {
        p *= 10;
    }
    for m in [1, 2, 5, 10] {
        if p * m >= raw {
            return p * m;
        }
    }
    p * 10
}

struct Scale {
    t0: u64,
    t1: u64,
}

impl Scale {
    fn contains(&self, t: u64) -> bool {
        (self.t0..=self.t1).contains(&t)
    }

    fn x(&self, t: u64) -> f64 {
        let t = t.clamp(self.t0, self.t1);
        LABEL_W + (t - self.t0) as f64 / (self.t1 - self.t0).max(1) as f64 * (WIDTH - LABEL_W - RIGHT_PAD)
    }
}

/// Every time that matters in a migration, to fit the axis around.
fn times(m: &MigrationReport) -> Vec<u64> {
    let tl = &m.timeline;
    let mut v: Vec<u64> = Vec::new();
    v.extend(
        tl.setup
            .iter()
            .chain(&tl.pause)
            .chain(&tl.resume)
            .chain(&tl.complete)
            .map(|s| s.ts_ns),
    );
    v.extend(tl.rounds.iter().map(|r| r.ts_ns));
    v.extend(
        [
            &tl.last_vm_frame_old_port,
            &tl.first_rarp,
            &tl.first_garp,
            &tl.first_vm_frame_new_port,
            &tl.first_frame_to_vm_new_port,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.ts_ns),
    );
    v.extend(tl.fdb_moves.iter().map(|f| f.ts_ns));
    v.extend(tl.black_holed.iter().map(|b| b.last_ns));
    for c in &m.connections {
        v.extend(&c.retransmit_ns);
        v.extend(c.first_progress_ns);
        if let Fate::Aborted { at_ns, .. } = c.fate {
            v.push(at_ns);
        }
    }
    v
}

/// Renders the whole analysis as one SVG document.
pub fn render(a: &Analysis) -> String {
    let mut body = String::new();
    let mut y = 20.0;
    let _ = writeln!(
        body,
        r#"<text x="20" y="{}" font-size="18" font-weight="bold" fill="{C_TEXT}">migmon: did every TCP session survive the migration?</text>"#,
        y + 8.0
    );
    y += 14.0;
    y = legend(&mut body, y);
    for w in &a.warnings {
        let _ = writeln!(
            body,
            r#"<text x="20" y="{y}" font-size="12" fill="{C_ABORT}">⚠ {}</text>"#,
            esc(w)
        );
        y += 16.0;
    }
    if a.migrations.is_empty() {
        let _ = writeln!(
            body,
            r#"<text x="20" y="{}" font-size="14" fill="{C_TEXT}">No migration in this trace.</text>"#,
            y + 10.0
        );
        y += 30.0;
    }
    for m in &a.migrations {
        y = panel(&mut body, m, y + 10.0);
    }
    let h = y + 20.0;
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<rect x="0" y="0" width="{WIDTH}" height="{h}" fill="white"/>
<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="3" height="6" fill="{C_PAUSE}" fill-opacity="0.18"/></pattern></defs>
{body}</svg>
"#
    )
}

fn legend(out: &mut String, y: f64) -> f64 {
    let items: [(&str, String); 9] = [
        (
            "vCPU running",
            format!(r#"<rect x="0" y="-9" width="18" height="10" rx="2" fill="{C_RUN}"/>"#),
        ),
        (
            "paused",
            format!(
                r#"<rect x="0" y="-10" width="18" height="12" fill="{C_PAUSE}" fill-opacity="0.25" stroke="{C_PAUSE}" stroke-opacity="0.5"/>"#
            ),
        ),
        (
            "blackout",
            r##"<rect x="0" y="-10" width="18" height="12" fill="url(#hatch)" stroke="#e0e0e0"/>"##
                .to_owned(),
        ),
        (
            "pre-copy",
            format!(
                r#"<rect x="0" y="-9" width="18" height="10" rx="2" fill="{C_PRECOPY}" fill-opacity="0.6"/>"#
            ),
        ),
        (
            "retransmit",
            r##"<circle cx="9" cy="-4" r="4" fill="#ef6c00"/>"##.to_owned(),
        ),
        (
            "forward progress",
            format!(r#"<circle cx="9" cy="-4" r="6" fill="none" stroke="{C_OK}" stroke-width="2.5"/>"#),
        ),
        (
            "abort",
            format!(
                r#"<g stroke="{C_ABORT}" stroke-width="3"><line x1="4" y1="-9" x2="14" y2="1"/><line x1="4" y1="1" x2="14" y2="-9"/></g>"#
            ),
        ),
        (
            "RARP / GARP",
            format!(r#"<path d="M3,-4 L9,-10 L15,-4 L9,2 Z" fill="{C_ANNOUNCE}"/>"#),
        ),
        (
            "FDB: MAC's port",
            format!(
                r#"<rect x="0" y="-9" width="18" height="10" rx="2" fill="{C_FDB}" fill-opacity="0.7"/>"#
            ),
        ),
    ];
    let mut x = 20.0;
    for (label, icon) in items {
        let _ = writeln!(
            out,
            r#"<g transform="translate({x:.1},{:.1})">{icon}</g>"#,
            y + 8.0
        );
        let _ = writeln!(
            out,
            "{}",
            text_at(x + 24.0, y + 8.0, "start", 11.0, "#555", label)
        );
        x += 24.0 + label.chars().count() as f64 * 6.6 + 18.0;
    }
    y + 26.0
}

struct Lane {
    label: String,
    sub: String,
    draw: Vec<String>,
}

fn bar(s: &Scale, from: u64, to: u64, y: f64, color: &str, opacity: f64, title: &str) -> String {
    let x0 = s.x(from);
    let w = (s.x(to) - x0).max(2.0);
    format!(
        r#"<rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" rx="3" fill="{color}" fill-opacity="{opacity}"><title>{}</title></rect>"#,
        y + 6.0,
        LANE_H - 12.0,
        esc(title)
    )
}

fn tick(s: &Scale, t: u64, y: f64, color: &str, title: &str) -> String {
    if !s.contains(t) {
        return String::new();
    }
    let x = s.x(t);
    format!(
        r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"><title>{}</title></line>"#,
        y + 4.0,
        y + LANE_H - 4.0,
        esc(title)
    )
}

fn diamond(s: &Scale, t: u64, y: f64, color: &str, title: &str) -> String {
    if !s.contains(t) {
        return String::new();
    }
    let (x, cy) = (s.x(t), y + LANE_H / 2.0);
    format!(
        r#"<path d="M{:.1},{cy:.1} L{x:.1},{:.1} L{:.1},{cy:.1} L{x:.1},{:.1} Z" fill="{color}" stroke="white" stroke-width="1"><title>{}</title></path>"#,
        x - 6.0,
        cy - 6.0,
        x + 6.0,
        cy + 6.0,
        esc(title)
    )
}

fn dot(s: &Scale, t: u64, y: f64, color: &str, r: f64, title: &str) -> String {
    if !s.contains(t) {
        return String::new();
    }
    format!(
        r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{color}" stroke="white" stroke-width="1"><title>{}</title></circle>"#,
        s.x(t),
        y + LANE_H / 2.0,
        esc(title)
    )
}

fn ring(s: &Scale, t: u64, y: f64, color: &str, title: &str) -> String {
    if !s.contains(t) {
        return String::new();
    }
    format!(
        r#"<circle cx="{:.1}" cy="{:.1}" r="7" fill="none" stroke="{color}" stroke-width="2.5"><title>{}</title></circle>"#,
        s.x(t),
        y + LANE_H / 2.0,
        esc(title)
    )
}

fn cross(s: &Scale, t: u64, y: f64, color: &str, title: &str) -> String {
    if !s.contains(t) {
        return String::new();
    }
    let (x, cy) = (s.x(t), y + LANE_H / 2.0);
    format!(
        r#"<g stroke="{color}" stroke-width="3" stroke-linecap="round"><title>{}</title><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/></g>"#,
        esc(title),
        x - 6.0,
        cy - 6.0,
        x + 6.0,
        cy + 6.0,
        x - 6.0,
        cy + 6.0,
        x + 6.0,
        cy - 6.0
    )
}

fn text_at(x: f64, y: f64, anchor: &str, size: f64, color: &str, s: &str) -> String {
    format!(
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}" fill="{color}">{}</text>"#,
        esc(s)
    )
}

/// The switch-over: from the VM's last frame on its old port to the last wire event after resume.
fn switch_over(m: &MigrationReport) -> Option<(u64, u64)> {
    let tl = &m.timeline;
    let p = tl.pause.as_ref()?.ts_ns;
    let r = tl.resume.as_ref()?.ts_ns;
    let lo = tl.last_vm_frame_old_port.as_ref().map_or(p, |l| l.ts_ns.min(p));
    let hi = [
        &tl.first_rarp,
        &tl.first_garp,
        &tl.first_vm_frame_new_port,
        &tl.first_frame_to_vm_new_port,
    ]
    .into_iter()
    .flatten()
    .map(|s| s.ts_ns)
    .chain(tl.fdb_moves.iter().map(|f| f.ts_ns))
    .chain(tl.black_holed.iter().map(|b| b.last_ns))
    .fold(r, u64::max);
    Some((lo, hi))
}

fn panel(out: &mut String, m: &MigrationReport, top: f64) -> f64 {
    let ts = times(m);
    let anchor = anchor_of(m);
    let lo = ts.iter().copied().min().unwrap_or(anchor).min(anchor);
    let hi = ts.iter().copied().max().unwrap_or(anchor).max(anchor + 1);
    let y = panel_range(out, m, top, lo, hi, "");
    // A short switch-over is invisible at the scale of the recovery: add a zoomed panel.
    match switch_over(m) {
        Some((zlo, zhi)) if zhi > zlo && (zhi - zlo).saturating_mul(20) < hi.saturating_sub(lo) => {
            panel_range(out, m, y + 10.0, zlo, zhi, " — zoom on the switch-over")
        }
        _ => y,
    }
}

/// What every lane builder draws against: the time scale, the row its marks are drawn at (moved to the lane's row
/// afterwards) and the pause the times are relative to.
struct Frame {
    s: Scale,
    top: f64,
    anchor: u64,
}

/// One panel: `m` between `lo` and `hi`, its lanes one per kind (vCPUs, migration phases, ports, bridges,
/// connections), then the pause and blackout across them and the time axis. Returns the y below it.
fn panel_range(out: &mut String, m: &MigrationReport, top: f64, lo: u64, hi: u64, suffix: &str) -> f64 {
    let span = hi.saturating_sub(lo).max(1_000_000);
    let f = Frame {
        s: Scale {
            t0: lo.saturating_sub(span / 12),
            t1: hi.saturating_add(span / 12),
        },
        top,
        anchor: anchor_of(m),
    };
    let mut lanes = vcpu_lanes(&f, m);
    lanes.push(phase_lane(&f, m));
    lanes.extend(
        wire_ports(&m.timeline)
            .iter()
            .map(|port| wire_lane(&f, &m.timeline, port)),
    );
    lanes.extend(fdb_lanes(&f, &m.timeline));
    lanes.extend(connection_lanes(&f, m));
    let lanes_top = header(out, m, top, suffix);
    let lanes_h = lanes.len() as f64 * LANE_H;
    lane_rows(out, &lanes, lanes_top);
    pause_and_blackout(out, &f, m, lanes_top, lanes_h);
    // Each lane's marks were drawn at y = `top`: move them to the lane's row.
    for (i, lane) in lanes.iter().enumerate() {
        let dy = lanes_top + i as f64 * LANE_H - top;
        let _ = writeln!(out, r#"<g transform="translate(0,{dy:.1})">"#);
        for d in &lane.draw {
            let _ = writeln!(out, "{d}");
        }
        let _ = writeln!(out, "</g>");
    }
    axis(out, &f, lanes_top + lanes_h)
}

/// The vCPU on the source (running until the pause) and on the destination (running from the resume).
fn vcpu_lanes(f: &Frame, m: &MigrationReport) -> Vec<Lane> {
    let Frame { s, top, anchor } = f;
    let (top, anchor) = (*top, *anchor);
    let tl = &m.timeline;
    let pause = tl.pause.as_ref().map(|p| p.ts_ns);
    let resume = tl.resume.as_ref().map(|r| r.ts_ns);
    let mut lanes: Vec<Lane> = Vec::new();
    let src_host = m.source_host.clone().unwrap_or_else(|| "source".into());
    let dst_host = m.destination_host.clone().unwrap_or_else(|| "destination".into());
    let mut draw = Vec::new();
    if let Some(p) = pause {
        draw.push(bar(s, s.t0, p, top, C_RUN, 0.85, "vCPU running on the source"));
        if resume.is_none() {
            draw.push(bar(
                s,
                p,
                s.t1,
                top,
                C_PAUSE,
                0.5,
                "vCPU paused until the end of the trace",
            ));
        }
    }
    lanes.push(Lane {
        label: format!("vCPU @ {src_host}"),
        sub: "source".into(),
        draw,
    });
    let mut draw = Vec::new();
    if let Some(r) = resume {
        draw.push(bar(
            s,
            r,
            s.t1,
            top,
            C_RUN,
            0.85,
            &format!("vCPU running on the destination from {}", rel(r, anchor)),
        ));
    }
    lanes.push(Lane {
        label: format!("vCPU @ {dst_host}"),
        sub: "destination".into(),
        draw,
    });
    lanes
}

/// Pre-copy, its rounds, the stop-and-copy and the announces.
fn phase_lane(f: &Frame, m: &MigrationReport) -> Lane {
    let Frame { s, top, anchor } = f;
    let (top, anchor) = (*top, *anchor);
    let tl = &m.timeline;
    let pause = tl.pause.as_ref().map(|p| p.ts_ns);
    let resume = tl.resume.as_ref().map(|r| r.ts_ns);
    let mut draw = Vec::new();
    if let (Some(st), Some(p)) = (
        tl.setup
            .as_ref()
            .map(|x| x.ts_ns)
            .or(tl.rounds.first().map(|r| r.ts_ns)),
        pause,
    ) {
        draw.push(bar(
            s,
            st,
            p,
            top,
            C_PRECOPY,
            0.6,
            &format!("pre-copy: {} round(s)", tl.rounds.len()),
        ));
    }
    for r in &tl.rounds {
        draw.push(tick(
            s,
            r.ts_ns,
            top,
            "#1565c0",
            &format!("round {}: {} pages at {}", r.n, r.pages, rel(r.ts_ns, anchor)),
        ));
    }
    if let (Some(p), Some(r)) = (pause, resume) {
        draw.push(bar(
            s,
            p,
            r,
            top,
            C_PAUSE,
            0.9,
            &format!("stop-and-copy: {}", fmt_dur(r.saturating_sub(p))),
        ));
    }
    for a in &tl.announces {
        draw.push(tick(
            s,
            a.ts_ns,
            top,
            C_ANNOUNCE,
            &format!("announce at {}", rel(a.ts_ns, anchor)),
        ));
    }
    Lane {
        label: "migration".into(),
        sub: format!("{} [{}]", m.mode.as_deref().unwrap_or("?"), m.source),
        draw,
    }
}

/// The ports that matter, one wire lane each: where the VM's frames were last and first seen, where it announced
/// itself, where frames reached it, where they were black-holed.
fn wire_ports(tl: &Timeline) -> Vec<String> {
    let mut ports: Vec<String> = Vec::new();
    for p in [
        &tl.last_vm_frame_old_port,
        &tl.first_vm_frame_new_port,
        &tl.first_rarp,
        &tl.first_garp,
        &tl.first_frame_to_vm_new_port,
    ]
    .into_iter()
    .flatten()
    .map(|x| x.port.clone())
    .chain(tl.black_holed.iter().map(|b| b.port.clone()))
    {
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// One port's lane: the VM's frames there, the first frame delivered, RARP and GARP, black-holed frames.
fn wire_lane(f: &Frame, tl: &Timeline, port: &String) -> Lane {
    let Frame { s, top, anchor } = f;
    let (top, anchor) = (*top, *anchor);
    let mut draw = Vec::new();
    if let Some(l) = tl.last_vm_frame_old_port.as_ref().filter(|l| &l.port == port) {
        draw.push(bar(
            s,
            s.t0,
            l.ts_ns,
            top,
            C_WIRE,
            0.35,
            "the VM's frames on its old port",
        ));
        draw.push(tick(
            s,
            l.ts_ns,
            top,
            C_WIRE,
            &format!("last VM frame at {}", rel(l.ts_ns, anchor)),
        ));
    }
    if let Some(f) = tl.first_vm_frame_new_port.as_ref().filter(|l| &l.port == port) {
        draw.push(bar(
            s,
            f.ts_ns,
            s.t1,
            top,
            C_WIRE,
            0.35,
            "the VM's frames on its new port",
        ));
        draw.push(tick(
            s,
            f.ts_ns,
            top,
            C_WIRE,
            &format!("first VM frame at {}", rel(f.ts_ns, anchor)),
        ));
    }
    if let Some(f) = tl.first_frame_to_vm_new_port.as_ref().filter(|l| &l.port == port) {
        draw.push(dot(
            s,
            f.ts_ns,
            top,
            C_OK,
            5.0,
            &format!("first frame delivered towards the VM at {}", rel(f.ts_ns, anchor)),
        ));
    }
    if let Some(r) = tl.first_rarp.as_ref().filter(|l| &l.port == port) {
        draw.push(diamond(
            s,
            r.ts_ns,
            top,
            C_ANNOUNCE,
            &format!("first RARP at {}", rel(r.ts_ns, anchor)),
        ));
    }
    if let Some(g) = tl.first_garp.as_ref().filter(|l| &l.port == port) {
        draw.push(diamond(
            s,
            g.ts_ns,
            top,
            "#f4511e",
            &format!("first GARP at {}", rel(g.ts_ns, anchor)),
        ));
    }
    for b in tl.black_holed.iter().filter(|b| &b.port == port) {
        black_hole_marks(f, b, &mut draw);
    }
    Lane {
        label: format!("wire {port}"),
        sub: "VM frames, announces".into(),
        draw,
    }
}

/// A cross where frames were black-holed at a port, with their count beside it.
fn black_hole_marks(f: &Frame, b: &BlackHole, draw: &mut Vec<String>) {
    let Frame { s, top, anchor } = f;
    let (top, anchor) = (*top, *anchor);
    draw.push(cross(
        s,
        b.last_ns,
        top,
        C_ABORT,
        &format!(
            "{} frame(s) black-holed, last at {}",
            b.frames,
            rel(b.last_ns, anchor)
        ),
    ));
    if !s.contains(b.last_ns) {
        return;
    }
    draw.push(text_at(
        s.x(b.last_ns) + 10.0,
        top + LANE_H / 2.0 + 4.0,
        "start",
        11.0,
        C_ABORT,
        &format!("{} black-holed", b.frames),
    ));
}

/// One lane per bridge that moved the VM's MAC: the port before and after the move.
fn fdb_lanes(f: &Frame, tl: &Timeline) -> Vec<Lane> {
    let Frame { s, top, anchor } = f;
    let (top, anchor) = (*top, *anchor);
    let mut lanes: Vec<Lane> = Vec::new();
    for f in &tl.fdb_moves {
        let mut draw = vec![
            bar(
                s,
                s.t0,
                f.ts_ns,
                top,
                C_FDB,
                0.3,
                &format!("MAC on {}", f.from_port.as_deref().unwrap_or("?")),
            ),
            bar(
                s,
                f.ts_ns,
                s.t1,
                top,
                C_FDB,
                0.7,
                &format!("MAC on {}", f.to_port),
            ),
            tick(
                s,
                f.ts_ns,
                top,
                "#00695c",
                &format!("FDB move at {}", rel(f.ts_ns, anchor)),
            ),
        ];
        draw.push(text_at(
            s.x(f.ts_ns) + 6.0,
            top + LANE_H / 2.0 + 4.0,
            "start",
            11.0,
            "white",
            &f.to_port,
        ));
        if let Some(from) = &f.from_port {
            draw.push(text_at(
                s.x(f.ts_ns) - 6.0,
                top + LANE_H / 2.0 + 4.0,
                "end",
                11.0,
                "#004d40",
                from,
            ));
        }
        lanes.push(Lane {
            label: format!("FDB {}", f.bridge),
            sub: "port of the VM's MAC".into(),
            draw,
        });
    }
    lanes
}

/// One lane per connection (up to [`MAX_CONN_LANES`]): its fate, retransmissions, progress and abort.
fn connection_lanes(f: &Frame, m: &MigrationReport) -> Vec<Lane> {
    let Frame { s, top, anchor } = f;
    let (top, anchor) = (*top, *anchor);
    let mut lanes: Vec<Lane> = Vec::new();
    let conns: Vec<_> = m.connections.iter().collect();
    for c in conns.iter().take(MAX_CONN_LANES) {
        let end = match c.fate {
            Fate::Aborted { at_ns, .. } => at_ns,
            _ => s.t1,
        };
        let color = match c.fate {
            Fate::Survived => C_OK,
            Fate::Aborted { .. } => C_ABORT,
            Fate::Unresolved => C_GREY,
        };
        let mut draw = vec![bar(s, s.t0, end, top, color, 0.25, &format!("{}", c.fate))];
        for (i, &t) in c.retransmit_ns.iter().enumerate() {
            draw.push(dot(
                s,
                t,
                top,
                "#ef6c00",
                4.0,
                &format!("retransmit #{} at {}", i + 1, rel(t, anchor)),
            ));
        }
        if let Some(p) = c.first_progress_ns {
            draw.push(ring(
                s,
                p,
                top,
                C_OK,
                &format!("forward progress at {}: {}", rel(p, anchor), c.progress_basis),
            ));
        }
        if let Fate::Aborted { at_ns, reason } = c.fate
            && s.contains(at_ns)
        {
            draw.push(cross(
                s,
                at_ns,
                top,
                C_ABORT,
                &format!("aborted: {reason} at {}", rel(at_ns, anchor)),
            ));
            draw.push(text_at(
                s.x(at_ns) + 10.0,
                top + LANE_H / 2.0 + 4.0,
                "start",
                11.0,
                C_ABORT,
                &reason.to_string(),
            ));
        }
        lanes.push(Lane {
            label: format!("{}:{} → :{}", c.tuple.saddr, c.tuple.sport, c.tuple.dport),
            sub: format!(
                "{}{}{}",
                c.fate,
                if c.opened_during_window {
                    " (opened in outage)"
                } else {
                    ""
                },
                match (c.basis, c.wire_agrees) {
                    (Basis::Wire, _) => " [wire]",
                    (_, Some(false)) => " [the wire disagrees]",
                    _ => "",
                }
            ),
            draw,
        });
    }
    if conns.len() > MAX_CONN_LANES {
        lanes.push(Lane {
            label: format!("… {} more connections", conns.len() - MAX_CONN_LANES),
            sub: "see the text or JSON report".into(),
            draw: Vec::new(),
        });
    }
    lanes
}

/// The panel's title and figures; returns where the lanes start.
fn header(out: &mut String, m: &MigrationReport, top: f64, suffix: &str) -> f64 {
    let mut y = top;
    let _ = writeln!(
        out,
        "{}",
        text_at(
            20.0,
            y + 14.0,
            "start",
            15.0,
            C_TEXT,
            &format!(
                "Migration {} ({}) VM {} — {} survived, {} aborted{suffix}",
                m.id,
                m.mode.as_deref().unwrap_or("?"),
                m.mac_text(),
                m.survived,
                m.aborted
            )
        )
    );
    let d = &m.downtime;
    let fig =
        |f: &Option<crate::correlate::Figure>| f.as_ref().map_or_else(|| "–".to_owned(), |f| fmt_dur(f.ns));
    let _ = writeln!(
        out,
        "{}",
        text_at(
            20.0,
            y + 32.0,
            "start",
            12.0,
            "#555",
            &format!(
                "vCPU pause {} · network blackout {} · convergence {} · longest recovery tail {}",
                fig(&d.vcpu_pause),
                fig(&d.blackout),
                fig(&d.convergence),
                fig(&d.max_recovery_tail)
            )
        )
    );
    y += 56.0;
    y
}

/// Zebra background and each lane's label.
fn lane_rows(out: &mut String, lanes: &[Lane], lanes_top: f64) {
    for (i, lane) in lanes.iter().enumerate() {
        let ly = lanes_top + i as f64 * LANE_H;
        if i % 2 == 0 {
            let _ = writeln!(
                out,
                r##"<rect x="0" y="{ly:.1}" width="{WIDTH}" height="{LANE_H}" fill="#f5f5f5"/>"##
            );
        }
        let _ = writeln!(
            out,
            "{}",
            text_at(12.0, ly + 12.0, "start", 12.0, C_TEXT, &lane.label)
        );
        let _ = writeln!(
            out,
            "{}",
            text_at(12.0, ly + 23.0, "start", 9.5, "#757575", &lane.sub)
        );
    }
}

/// The pause, shaded across every lane, and the blackout hatched.
#[expect(
    clippy::many_single_char_names,
    reason = "s is the scale, m the migration, as in every helper"
)]
fn pause_and_blackout(out: &mut String, f: &Frame, m: &MigrationReport, lanes_top: f64, lanes_h: f64) {
    let s = &f.s;
    let tl = &m.timeline;
    let d = &m.downtime;
    let pause = tl.pause.as_ref().map(|p| p.ts_ns);
    let resume = tl.resume.as_ref().map(|r| r.ts_ns);
    if let Some(p) = pause {
        let r = resume.unwrap_or(s.t1);
        let x0 = s.x(p);
        let w = (s.x(r) - x0).max(2.0);
        let _ = writeln!(
            out,
            r#"<rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{C_PAUSE}" fill-opacity="0.15" stroke="{C_PAUSE}" stroke-opacity="0.5"/>"#,
            lanes_top - 4.0,
            lanes_h + 8.0
        );
        let _ = writeln!(
            out,
            "{}",
            text_at(
                x0 + w / 2.0,
                lanes_top - 6.0,
                "middle",
                11.0,
                C_PAUSE,
                &format!(
                    "paused {}",
                    resume.map_or_else(|| "until the end".to_owned(), |r| fmt_dur(r.saturating_sub(p)))
                )
            )
        );
    }
    let blackout_start = [&tl.last_vm_frame_old_port, &tl.last_frame_to_vm_old_port]
        .into_iter()
        .flatten()
        .map(|x| x.ts_ns)
        .max()
        .or(pause);
    if let Some(b) = &d.blackout
        && let Some(start) = blackout_start
    {
        let x0 = s.x(start);
        let w = (s.x(start + b.ns) - x0).max(2.0);
        let _ = writeln!(
            out,
            r#"<rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="url(#hatch)"><title>network blackout {}</title></rect>"#,
            lanes_top,
            lanes_h,
            fmt_dur(b.ns)
        );
    }
}

/// The time axis at `y`, ticked at round steps relative to the pause; returns the y below it.
#[expect(
    clippy::many_single_char_names,
    reason = "s is the scale, t a time, x its position, as in every helper"
)]
fn axis(out: &mut String, f: &Frame, y: f64) -> f64 {
    let (s, anchor) = (&f.s, f.anchor);
    let step = tick_step(s.t1 - s.t0);
    let _ = writeln!(
        out,
        r##"<line x1="{LABEL_W}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#424242"/>"##,
        y + 4.0,
        WIDTH - RIGHT_PAD,
        y + 4.0
    );
    let first = if anchor >= s.t0 {
        anchor - (anchor - s.t0) / step * step
    } else {
        anchor + (s.t0 - anchor).div_ceil(step) * step
    };
    let mut t = first;
    while t <= s.t1 {
        let x = s.x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#424242"/>"##,
            y + 4.0,
            y + 9.0
        );
        let label = if t == anchor {
            "pause".to_owned()
        } else {
            rel(t, anchor)
        };
        let _ = writeln!(out, "{}", text_at(x, y + 21.0, "middle", 10.0, "#424242", &label));
        t += step;
    }
    y + 30.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlate::correlate, fixtures::quick_trace};

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1_000_000_000), 200_000_000);
        assert_eq!(tick_step(13_000_000_000), 2_000_000_000);
        assert_eq!(tick_step(45_000_000), 10_000_000);
    }

    #[test]
    fn svg_has_every_lane_and_mark() {
        let svg = render(&correlate(&quick_trace()));
        assert!(svg.starts_with("<svg"));
        for needle in [
            "vCPU @ hostA",
            "migration",
            "paused 8.00 s",
            "ETIMEDOUT",
            "RST received",
            "retransmit #3",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
    }
}
/// `MIGMON_SVG_SAMPLES=DIR cargo test -p monitor write_sample_svgs` writes the timelines of the synthetic traces,
/// to look at them (`rsvg-convert live.svg -o live.png`).
#[cfg(test)]
mod sample {
    #[test]
    fn write_sample_svgs() {
        use crate::{
            correlate::correlate,
            fixtures::{live_trace, quick_trace},
        };
        let Ok(dir) = std::env::var("MIGMON_SVG_SAMPLES") else {
            return;
        };
        let dir = std::path::Path::new(&dir);
        std::fs::write(dir.join("live.svg"), super::render(&correlate(&live_trace()))).unwrap();
        std::fs::write(dir.join("quick.svg"), super::render(&correlate(&quick_trace()))).unwrap();
    }
}
