//! The timeline of one upgrade: its lifecycle events on one clock, the phases
//! between them, and a picture of them as SVG.
//!
//! The QEMU harness (times on the host's clock, with the bare kexec of the
//! same kernels for comparison) and `kupgrade report --svg` (times from the
//! report on the machine itself) draw the same picture with [`svg`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::events::Event;

/// A lifecycle event at a time on the timeline's clock, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Mark {
    pub event: String,
    pub t_ms: f64,
}

impl Mark {
    pub fn new(event: Event, t_ms: f64) -> Self {
        Mark {
            event: event.name().to_string(),
            t_ms,
        }
    }
}

/// Which kernel a phase runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Old,
    /// From the kexec call to the new kernel's init: the old kernel's
    /// shutdown and the new one's boot.
    Kexec,
    New,
}

/// The phases between consecutive lifecycle events, named for what happens.
/// Without pre-copy there is no `predump`: the freeze starts at
/// `preflight-ok` (see [`phases`]).
pub const PHASES: &[(Event, Event, &str)] = &[
    (
        Event::PreflightOk,
        Event::Predump,
        "pre-copy (CRIU pre-dumps)",
    ),
    (Event::Predump, Event::Frozen, "freeze"),
    (Event::Frozen, Event::Dumped, "checkpoint (CRIU dump)"),
    (Event::Dumped, Event::StateCaptured, "device state"),
    (Event::StateCaptured, Event::ImageWritten, "image write"),
    (Event::ImageWritten, Event::Kexec, "last checks"),
    // The agent's sync and read-only remount come after its kexec event.
    (Event::Kexec, Event::InitStart, "kexec to new kernel's init"),
    (Event::InitStart, Event::ModulesLoaded, "modules"),
    (Event::ModulesLoaded, Event::RootMounted, "root mount"),
    (
        Event::RootMounted,
        Event::ImageVerified,
        "image verify and unpack",
    ),
    (Event::ImageVerified, Event::NetRestored, "network"),
    (Event::NetRestored, Event::Restored, "CRIU restore"),
    (Event::Restored, Event::ExecInit, "to the real init"),
];

#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub side: Side,
    pub start_ms: f64,
    pub end_ms: f64,
}

impl Phase {
    pub fn ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }
}

/// When `event` first happened.
pub fn at(marks: &[Mark], event: Event) -> Option<f64> {
    marks
        .iter()
        .find(|m| m.event == event.name())
        .map(|m| m.t_ms)
}

/// Time from the first `from` to the first `to`.
pub fn span_ms(marks: &[Mark], from: Event, to: Event) -> Option<f64> {
    Some(at(marks, to)? - at(marks, from)?)
}

/// The workloads' pause: frozen on the old kernel to restored on the new.
pub fn blackout_ms(marks: &[Mark]) -> Option<f64> {
    span_ms(marks, Event::Frozen, Event::Restored)
}

/// The reboot itself: the kexec call to the real init's exec.
pub fn kexec_to_init_ms(marks: &[Mark]) -> Option<f64> {
    span_ms(marks, Event::Kexec, Event::ExecInit)
}

/// Every phase whose two events were both seen, in pipeline order.
pub fn phases(marks: &[Mark]) -> Vec<Phase> {
    PHASES
        .iter()
        .filter_map(|&(a, b, name)| {
            let side = match (a.is_before_kexec(), b.is_before_kexec()) {
                (true, true) => Side::Old,
                (true, false) => Side::Kexec,
                _ => Side::New,
            };
            let start = at(marks, a).or_else(|| {
                (a == Event::Predump)
                    .then(|| at(marks, Event::PreflightOk))
                    .flatten()
            });
            Some(Phase {
                name,
                side,
                start_ms: start?,
                end_ms: at(marks, b)?,
            })
        })
        .collect()
}

/// One upgrade to draw.
#[derive(Clone, Debug, Default)]
pub struct Picture {
    /// Usually "OLD -> NEW".
    pub title: String,
    /// Where the times come from, printed under the title.
    pub clock: String,
    pub marks: Vec<Mark>,
    /// The bare kexec of the same kernels with no workloads (kexec to
    /// exec-init), drawn from this upgrade's kexec for comparison.
    pub floor_ms: Option<f64>,
}

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 250.0;
const RIGHT_W: f64 = 90.0;
const ROW_H: f64 = 22.0;
const BAR_H: f64 = 14.0;
const HEADER_H: f64 = 70.0;
const LEGEND_H: f64 = 36.0;

const OLD: &str = "#4e79a7";
const KEXEC: &str = "#b07aa1";
const NEW: &str = "#f28e2b";
const PAUSED: &str = "#59595c";
const FLOOR: &str = "#59a14f";

fn colour(side: Side) -> &'static str {
    match side {
        Side::Old => OLD,
        Side::Kexec => KEXEC,
        Side::New => NEW,
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn seconds(ms: f64) -> String {
    if ms.abs() < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// A tick step giving at most ten ticks over `range_ms`.
fn tick_step(range_ms: f64) -> f64 {
    const STEPS: &[f64] = &[
        10.0, 20.0, 50.0, 100.0, 200.0, 250.0, 500.0, 1000.0, 2000.0, 2500.0, 5000.0, 10000.0,
        20000.0, 30000.0, 60000.0,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| range_ms / s <= 10.0)
        .unwrap_or(range_ms / 10.0)
}

/// A bar row: label, bar from `start` to `end` (ms on the picture's clock),
/// its length written after it.
struct Row<'a> {
    label: &'a str,
    class: &'a str,
    fill: &'a str,
    start_ms: f64,
    end_ms: f64,
}

/// The pictures, one panel each, stacked in one SVG document.
pub fn svg(pictures: &[Picture]) -> String {
    let mut body = String::new();
    let mut y = 0.0;
    for p in pictures {
        y += panel(&mut body, p, y);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{y}\" \
         viewBox=\"0 0 {WIDTH} {y}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{y}\" fill=\"white\"/>"
    );
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

/// Draws one picture at height `top`; returns its height.
fn panel(s: &mut String, p: &Picture, top: f64) -> f64 {
    let phases = phases(&p.marks);
    let blackout = blackout_ms(&p.marks);
    let kexec_at = at(&p.marks, Event::Kexec);
    let mut rows: Vec<Row> = phases
        .iter()
        .map(|ph| Row {
            label: ph.name,
            class: "phase",
            fill: colour(ph.side),
            start_ms: ph.start_ms,
            end_ms: ph.end_ms,
        })
        .collect();
    let n_phases = rows.len();
    if let (Some(a), Some(b)) = (at(&p.marks, Event::Frozen), at(&p.marks, Event::Restored)) {
        rows.push(Row {
            label: "workloads paused",
            class: "paused",
            fill: PAUSED,
            start_ms: a,
            end_ms: b,
        });
    }
    if let (Some(a), Some(b)) = (kexec_at, at(&p.marks, Event::ExecInit)) {
        rows.push(Row {
            label: "kexec to real init, this upgrade",
            class: "reboot",
            fill: KEXEC,
            start_ms: a,
            end_ms: b,
        });
    }
    if let (Some(k), Some(f)) = (kexec_at, p.floor_ms) {
        rows.push(Row {
            label: "bare kexec, no workloads (floor)",
            class: "floor",
            fill: FLOOR,
            start_ms: k,
            end_ms: k + f,
        });
    }
    let t0 = rows
        .iter()
        .map(|r| r.start_ms)
        .fold(f64::INFINITY, f64::min);
    let t1 = rows
        .iter()
        .map(|r| r.end_ms)
        .fold(f64::NEG_INFINITY, f64::max);
    let (t0, t1) = if rows.is_empty() {
        (0.0, 1.0)
    } else {
        (t0, t1)
    };
    let range = (t1 - t0).max(1.0);
    let chart_w = WIDTH - LABEL_W - RIGHT_W;
    let x = |t: f64| LABEL_W + (t - t0) / range * chart_w;

    let _ = writeln!(s, "<g transform=\"translate(0,{top})\">");
    let _ = writeln!(
        s,
        "<text x=\"12\" y=\"22\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        escape(&p.title)
    );
    let mut figures = Vec::new();
    if let Some(b) = blackout {
        figures.push(format!("workloads paused {}", seconds(b)));
    }
    if let Some(f) = p.floor_ms {
        figures.push(format!("bare kexec {}", seconds(f)));
        if let Some(b) = blackout.filter(|_| f > 0.0) {
            figures.push(format!("ratio {:.2}", b / f));
        }
    }
    let _ = writeln!(
        s,
        "<text x=\"12\" y=\"40\">{}</text>",
        escape(&figures.join(" · "))
    );
    let _ = writeln!(
        s,
        "<text x=\"12\" y=\"56\" fill=\"#666\">{}</text>",
        escape(&p.clock)
    );

    let rows_top = HEADER_H + 8.0;
    let rows_bottom = rows_top + ROW_H * rows.len() as f64 + 4.0;
    let step = tick_step(range);
    let mut k = 0.0;
    while k * step <= range + 1e-9 {
        let tx = x(t0 + k * step);
        let label = if step >= 1000.0 {
            format!("{} s", k * step / 1000.0)
        } else {
            format!("{} ms", k * step)
        };
        let _ = writeln!(
            s,
            "<line x1=\"{tx:.1}\" y1=\"{}\" x2=\"{tx:.1}\" y2=\"{rows_bottom}\" stroke=\"#ddd\"/>\
             <text x=\"{tx:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#666\">{label}</text>",
            HEADER_H + 2.0,
            HEADER_H
        );
        k += 1.0;
    }
    if let Some(kx) = kexec_at.map(x) {
        let _ = writeln!(
            s,
            "<line class=\"kexec\" x1=\"{kx:.1}\" y1=\"{}\" x2=\"{kx:.1}\" y2=\"{rows_bottom}\" \
             stroke=\"#333\" stroke-dasharray=\"4 3\"/>",
            HEADER_H + 2.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let ry = rows_top + ROW_H * i as f64;
        if i == n_phases && i > 0 {
            let _ = writeln!(
                s,
                "<line x1=\"12\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#999\"/>",
                ry - 2.0,
                WIDTH - 12.0,
                ry - 2.0
            );
        }
        let (bx, bw) = (x(r.start_ms), (x(r.end_ms) - x(r.start_ms)).max(1.0));
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect class=\"{}\" x=\"{bx:.2}\" y=\"{ry:.1}\" width=\"{bw:.2}\" height=\"{BAR_H}\" fill=\"{}\">\
             <title>{}: {}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LABEL_W - 8.0,
            ry + BAR_H - 3.0,
            escape(r.label),
            r.class,
            r.fill,
            escape(r.label),
            seconds(r.end_ms - r.start_ms),
            bx + bw + 4.0,
            ry + BAR_H - 3.0,
            seconds(r.end_ms - r.start_ms)
        );
    }
    let ly = rows_bottom + 20.0;
    let mut lx = 12.0;
    for (name, fill) in [
        ("old kernel", OLD),
        ("kexec and boot", KEXEC),
        ("new kernel", NEW),
        ("workloads paused", PAUSED),
        ("bare kexec (floor)", FLOOR),
    ] {
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{fill}\"/>\
             <text x=\"{}\" y=\"{ly:.1}\">{name}</text>",
            ly - 10.0,
            lx + 16.0
        );
        lx += 30.0 + 7.0 * name.len() as f64;
    }
    s.push_str("</g>\n");
    rows_bottom + LEGEND_H
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks() -> Vec<Mark> {
        [
            (Event::PreflightOk, 0.0),
            (Event::Predump, 40.0),
            (Event::Frozen, 100.0),
            (Event::Dumped, 700.0),
            (Event::StateCaptured, 710.0),
            (Event::ImageWritten, 1200.0),
            (Event::Kexec, 1203.0),
            (Event::InitStart, 4600.0),
            (Event::ModulesLoaded, 5000.0),
            (Event::RootMounted, 5500.0),
            (Event::ImageVerified, 6200.0),
            (Event::NetRestored, 6700.0),
            (Event::Restored, 8100.0),
            (Event::ExecInit, 8150.0),
        ]
        .into_iter()
        .map(|(e, t)| Mark::new(e, t))
        .collect()
    }

    #[test]
    fn phases_follow_the_events_with_their_kernel() {
        let p = phases(&marks());
        assert_eq!(p.len(), PHASES.len());
        assert_eq!((p[0].name, p[0].ms()), ("pre-copy (CRIU pre-dumps)", 40.0));
        assert_eq!((p[1].name, p[1].ms()), ("freeze", 60.0));
        let kexec = p
            .iter()
            .find(|p| p.name == "kexec to new kernel's init")
            .unwrap();
        assert_eq!((kexec.side, kexec.ms()), (Side::Kexec, 3397.0));
        assert_eq!(p[1].side, Side::Old);
        assert_eq!(p.last().unwrap().side, Side::New);
        assert_eq!(blackout_ms(&marks()), Some(8000.0));
        assert_eq!(kexec_to_init_ms(&marks()), Some(6947.0));
    }

    /// Without pre-copy (no `predump`), the freeze starts at `preflight-ok`.
    #[test]
    fn without_precopy_the_freeze_starts_at_the_preflight() {
        let m: Vec<Mark> = marks()
            .into_iter()
            .filter(|m| m.event != "predump")
            .collect();
        let p = phases(&m);
        assert_eq!(p.len(), PHASES.len() - 1);
        assert_eq!((p[0].name, p[0].ms()), ("freeze", 100.0));
        assert_eq!(p[0].side, Side::Old);
        assert_eq!(blackout_ms(&m), Some(8000.0));
    }

    #[test]
    fn a_missing_event_drops_only_its_phases() {
        let m: Vec<Mark> = marks()
            .into_iter()
            .filter(|m| m.event != "state-captured")
            .collect();
        let names: Vec<&str> = phases(&m).iter().map(|p| p.name).collect();
        assert!(!names.contains(&"device state") && !names.contains(&"image write"));
        assert_eq!(names.len(), PHASES.len() - 2);
    }

    /// The value of `attr` on the first element carrying `class="CLASS"`.
    fn attr(svg: &str, class: &str, attr: &str) -> f64 {
        let el = &svg[svg.find(&format!("class=\"{class}\"")).unwrap()..];
        let v = &el[el.find(&format!(" {attr}=\"")).unwrap() + attr.len() + 3..];
        v[..v.find('"').unwrap()].parse().unwrap()
    }

    #[test]
    fn the_picture_has_a_bar_per_phase_and_the_floor_to_scale() {
        let pic = Picture {
            title: "a -> b".into(),
            clock: "host clock".into(),
            marks: marks(),
            floor_ms: Some(3473.5),
        };
        let svg = svg(&[pic]);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("class=\"phase\"").count(), PHASES.len());
        assert_eq!(svg.matches("class=\"floor\"").count(), 1);
        // The floor is half this upgrade's kexec-to-init, drawn from its kexec.
        let ratio = attr(&svg, "floor", "width") / attr(&svg, "reboot", "width");
        assert!((ratio - 0.5).abs() < 0.001, "{ratio}");
        assert_eq!(attr(&svg, "floor", "x"), attr(&svg, "reboot", "x"));
        assert!(svg.contains("ratio 2.30"), "{svg}");
        assert!(svg.contains("workloads paused 8.00 s"));
    }

    #[test]
    fn without_a_floor_there_is_no_floor_bar_and_text_is_escaped() {
        let pic = Picture {
            title: "<old> & \"new\"".into(),
            marks: marks(),
            ..Default::default()
        };
        let svg = svg(&[pic.clone(), pic]);
        assert_eq!(svg.matches("class=\"floor\"").count(), 0);
        assert_eq!(svg.matches("class=\"phase\"").count(), 2 * PHASES.len());
        assert!(svg.contains("&lt;old&gt; &amp; &quot;new&quot;"));
        assert!(!svg.contains("<old>"));
    }

    #[test]
    fn ticks_stay_few() {
        assert_eq!(tick_step(8000.0), 1000.0);
        assert_eq!(tick_step(900.0), 100.0);
        assert_eq!(tick_step(45_000.0), 5000.0);
    }
}
