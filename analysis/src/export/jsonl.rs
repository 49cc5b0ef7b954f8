//! JSON lines: every event of the trace in time order, then one `migration_verdict` line per migration and one
//! `connection_verdict` line per judged connection (with the `migration` id), so `jq` can answer questions directly.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

use serde_json::{Value, json};

use crate::{correlate::Analysis, trace::Trace};

/// Writes the file.
pub fn write(path: &Path, t: &Trace, a: &Analysis) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    let mut events: Vec<_> = t.events.iter().collect();
    events.sort_by_key(|e| e.ts_ns());
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    for m in &a.migrations {
        let mut v = serde_json::to_value(m)?;
        if let Value::Object(o) = &mut v {
            o.remove("connections");
            o.insert("kind".into(), json!("migration_verdict"));
        }
        serde_json::to_writer(&mut out, &v)?;
        out.write_all(b"\n")?;
        for c in &m.connections {
            let mut v = serde_json::to_value(c)?;
            if let Value::Object(o) = &mut v {
                o.insert("kind".into(), json!("connection_verdict"));
                o.insert("migration".into(), json!(m.id));
            }
            serde_json::to_writer(&mut out, &v)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlate::correlate, fixtures::quick_trace};

    #[test]
    fn events_then_verdicts() {
        let ev = quick_trace();
        let t = Trace {
            events: ev.clone(),
            ..Trace::default()
        };
        let a = correlate(&ev);
        let path = std::env::temp_dir().join(format!("migmon-jsonl-{}.jsonl", std::process::id()));
        write(&path, &t, &a).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), ev.len() + 1 + 5);
        let ts: Vec<u64> = lines[..ev.len()]
            .iter()
            .map(|l| l["ts_ns"].as_u64().unwrap())
            .collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
        let verdicts: Vec<&Value> = lines
            .iter()
            .filter(|l| l["kind"] == "connection_verdict")
            .collect();
        assert_eq!(verdicts.len(), 5);
        assert!(verdicts.iter().all(|v| v["migration"] == "quick-1"));
        std::fs::remove_file(&path).unwrap();
    }
}
