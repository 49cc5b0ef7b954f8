//! What the trace tests share: everything that reads a trace, run on bytes.

#![allow(dead_code, reason = "each test file uses its part")]

use std::{io::Cursor, path::Path};

use migmon_analysis::{
    check::{self, Limits},
    correlate, export, report,
    trace::{self, TraceError},
    whatif::{self, Settings},
};

/// Reads `bytes` as a trace and runs everything that reads one. `None` when the reader refused it (not a trace);
/// otherwise whether the gate passed, and whether it would have with `--allow-damaged`.
pub fn gate(bytes: &[u8], scratch: &Path) -> Option<(bool, bool)> {
    let t = match trace::read_trace_from(Cursor::new(bytes), Path::new("mutated.trace")) {
        Ok(t) => t,
        Err(TraceError::NoHeader { .. } | TraceError::Version { .. }) => return None,
        Err(e) => panic!("reading from memory cannot fail otherwise: {e}"),
    };
    let a = correlate::analyse(&t);
    let _ = report::render_text(&a, "mutated");
    let _ = report::render_json(&a);
    let _ = report::html::render(&a, "mutated");
    let _ = report::svg::render(&a);
    let _ = report::compare::render(&a, Some(&Settings::default().into()));
    let scenario = Settings {
        tcp_retries2: 5,
        ..Settings::default()
    };
    let _ = whatif::render_text(&whatif::whatif(&a, &Settings::default(), &scenario));
    let _ = export::perfetto::encode(&t, &a);
    export::jsonl::write(&scratch.join("out.jsonl"), &t, &a).unwrap();
    export::pcapng::write(&scratch.join("out.pcapng"), &t, &a).unwrap();
    let v = check::evaluate(&a, &Limits::default());
    let _ = v.junit().unwrap();
    let lenient = Limits {
        allow_damaged: true,
        ..Limits::default()
    };
    Some((v.passed(), check::evaluate(&a, &lenient).passed()))
}
