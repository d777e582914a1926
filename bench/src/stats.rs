//! Pure helpers: medians, spreads, percentiles, ratios and table formatting.

use serde::{Deserialize, Serialize};

/// A median with its spread over repeated runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

/// The median of `xs` (the mean of the two middle values for an even count); NaN when empty.
/// NaN values are ignored.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, min and max of `xs` (NaN values ignored).
pub fn summarize(xs: &[f64]) -> Summary {
    let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() {
        return Summary { median: f64::NAN, min: f64::NAN, max: f64::NAN, n: 0 };
    }
    Summary { median: median(&v), min, max, n: v.len() }
}

/// The `p`-th percentile (0..=100) of `xs` by the nearest-rank method; NaN when empty.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `tracked / untracked`, NaN when the untracked value is not positive.
pub fn ratio(tracked: f64, untracked: f64) -> f64 {
    if untracked > 0.0 && tracked.is_finite() {
        tracked / untracked
    } else {
        f64::NAN
    }
}

/// The ratio of a tracked round to the untracked rounds on both sides of it (ABAB...): the
/// tracked value over the mean of its neighbours.
pub fn bracketed_ratio(before: f64, tracked: f64, after: f64) -> f64 {
    ratio(tracked, (before + after) / 2.0)
}

/// `0.91 (0.85–0.97)` with `digits` decimals; `n/a` for NaN.
pub fn fmt_summary(s: &Summary, digits: usize) -> String {
    if s.n == 0 || s.median.is_nan() {
        return "n/a".into();
    }
    if s.n == 1 {
        return format!("{:.*}", digits, s.median);
    }
    format!("{:.*} ({:.*}–{:.*})", digits, s.median, digits, s.min, digits, s.max)
}

/// A number with a thousands separator (`12 345`), rounded.
pub fn fmt_count(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let neg = x < 0.0;
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

/// A duration in seconds as `µs`, `ms` or `s`, three significant figures or so.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "n/a".into();
    }
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// The table as markdown (`md`) or as aligned text.
pub fn table(md: bool, headers: &[&str], rows: &[Vec<String>]) -> String {
    if md {
        markdown_table(headers, rows)
    } else {
        text_table(headers, rows)
    }
}

/// A Markdown table.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    out.push('|');
    for h in headers {
        out.push_str(&format!(" {h} |"));
    }
    out.push_str("\n|");
    for _ in headers {
        out.push_str("---|");
    }
    out.push('\n');
    for r in rows {
        out.push('|');
        for (i, _) in headers.iter().enumerate() {
            let cell = r.get(i).map(String::as_str).unwrap_or("");
            out.push_str(&format!(" {} |", cell.replace('|', "\\|")));
        }
        out.push('\n');
    }
    out
}

/// A plain-text table with aligned columns, for the terminal.
pub fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, w) in widths.iter().enumerate() {
            let c = cells.get(i).copied().unwrap_or("");
            s.push_str(c);
            if i + 1 < widths.len() {
                s.push_str(&" ".repeat(w - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    let rule: String = widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  ");
    out.push_str(&rule);
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Escapes text for SVG/XML.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn summaries_and_format() {
        let s = summarize(&[0.9, 0.8, 1.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (0.9, 0.8, 1.0, 3));
        assert_eq!(fmt_summary(&s, 2), "0.90 (0.80–1.00)");
        assert_eq!(fmt_summary(&summarize(&[]), 2), "n/a");
        assert_eq!(fmt_summary(&summarize(&[0.5]), 1), "0.5");
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(50.0, 100.0), 0.5);
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(bracketed_ratio(90.0, 50.0, 110.0), 0.5);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_count(1234567.0), "1\u{202f}234\u{202f}567");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_secs(0.0000125), "12.5 µs");
        assert_eq!(fmt_secs(0.25), "250.00 ms");
        let t = markdown_table(&["a", "b"], &[vec!["1".into(), "x|y".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | x\\|y |\n");
        let tt = text_table(&["name", "v"], &[vec!["cnproc".into(), "1".into()]]);
        assert!(tt.starts_with("name    v\n"));
        assert!(tt.contains("cnproc  1"));
        assert_eq!(xml_escape("a<b&"), "a&lt;b&amp;");
    }
}
