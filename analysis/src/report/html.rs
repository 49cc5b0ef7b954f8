//! The HTML report: the SVG timeline, then the text report, in one self-contained page.

use super::{render_text, svg};
use crate::correlate::Analysis;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn warnings(a: &Analysis) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for w in &a.warnings {
        let _ = writeln!(s, "<p class=\"warn\">⚠ {}</p>", esc(w));
    }
    s
}

/// Renders the page.
pub fn render(a: &Analysis, title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>migmon report: {t}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em;color:#212121}} pre{{background:#fafafa;padding:1em;\
         border:1px solid #e0e0e0;overflow-x:auto}} .warn{{color:#c62828}}</style></head><body>\n\
         <h1>migmon report: {t}</h1>\n{warn}<div>{svg}</div>\n<h2>Report</h2>\n<pre>{text}</pre>\n</body></html>\n",
        t = esc(title),
        warn = warnings(a),
        svg = svg::render(a),
        text = esc(&render_text(a, title)),
    )
}
