//! An SVG plot of the latency distributions, configurations side by side: one
//! box per series (box p25–p75, line at the median, whiskers p1–p99, a dot
//! at the maximum) on a logarithmic latency axis. Plain SVG text, no crate.
//!
//! ```
//! use vmm::bench::plot::{svg, Series};
//! let s = svg(&[Series { label: "anon".into(), samples_ns: vec![1000.0, 2000.0, 5000.0] }]);
//! assert!(s.starts_with("<svg") && s.contains("anon"));
//! ```

use std::fmt::Write as _;

use super::report::{fmt_ns, FaultsReport};
use super::stats::quantile;

/// One box of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    /// Label under the box.
    pub label: String,
    /// Latencies in ns.
    pub samples_ns: Vec<f64>,
}

/// Every series of a report: each pass of each configuration, then its raw
/// and host baselines.
pub fn series(report: &FaultsReport) -> Vec<Series> {
    let mut out = Vec::new();
    for c in &report.configurations {
        for p in &c.passes {
            out.push(Series {
                label: format!("{} {}", c.backing, p.pass),
                samples_ns: p.samples_ns.clone(),
            });
        }
        if let Some(b) = &c.baselines {
            if let Some(r) = &b.raw {
                out.push(Series {
                    label: format!("{} raw KVM", c.backing),
                    samples_ns: r.samples_ns.clone(),
                });
            }
            out.push(Series {
                label: format!("{} host only", b.host_kind),
                samples_ns: b.host_samples_ns.clone(),
            });
        }
    }
    out
}

/// Renders `series` as an SVG document.
pub fn svg(series: &[Series]) -> String {
    const W_BOX: f64 = 70.0;
    const LEFT: f64 = 70.0;
    const TOP: f64 = 30.0;
    const H: f64 = 360.0;
    const BOTTOM: f64 = 150.0;
    let stats: Vec<[f64; 6]> = series
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = s.samples_ns.iter().copied().filter(|x| *x > 0.0).collect();
            v.sort_by(f64::total_cmp);
            [
                quantile(&v, 0.01),
                quantile(&v, 0.25),
                quantile(&v, 0.5),
                quantile(&v, 0.75),
                quantile(&v, 0.99),
                v.last().copied().unwrap_or(0.0),
            ]
        })
        .collect();
    let lo = stats
        .iter()
        .map(|s| s[0])
        .filter(|x| *x > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = stats.iter().map(|s| s[5]).fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    } else {
        (1.0, 1e6)
    };
    let y = |ns: f64| TOP + H - (ns.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * H;
    let width = LEFT + W_BOX * series.len().max(1) as f64 + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" font-family="sans-serif" font-size="11">"#,
        TOP + H + BOTTOM
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="13">guest page-fault latency per access (log scale; box p25-p75, whiskers p1-p99, dot max)</text>"#
    );
    let mut decade = lo;
    while decade <= hi * 1.001 {
        let yy = y(decade);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.0}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            width - 20.0,
            LEFT - 6.0,
            yy + 4.0,
            axis_label(decade)
        );
        decade *= 10.0;
    }
    let colors = [
        "#4878d0", "#ee854a", "#6acc64", "#d65f5f", "#956cb4", "#8c613c", "#dc7ec0", "#797979",
    ];
    for (i, (series, st)) in series.iter().zip(&stats).enumerate() {
        let cx = LEFT + W_BOX * (i as f64 + 0.5);
        let c = colors[i % colors.len()];
        let [p1, p25, p50, p75, p99, max] = *st;
        let _ = writeln!(
            s,
            r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}"/>"#,
            y(p1),
            y(p99)
        );
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}" fill-opacity="0.35" stroke="{c}"/>"#,
            cx - W_BOX * 0.3,
            y(p75),
            W_BOX * 0.6,
            (y(p25) - y(p75)).max(1.0)
        );
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black" stroke-width="2"/>"#,
            cx - W_BOX * 0.3,
            cx + W_BOX * 0.3,
            y(p50),
            y(p50)
        );
        let _ = writeln!(
            s,
            r#"<circle cx="{cx:.1}" cy="{:.1}" r="2.5" fill="{c}"/>"#,
            y(max)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate({:.1},{:.1}) rotate(50)">{} ({})</text>"#,
            cx - 4.0,
            TOP + H + 12.0,
            xml_escape(&series.label),
            fmt_ns(p50)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// `10ns`, `1us`, `100ms`: decades without decimals.
fn axis_label(ns: f64) -> String {
    let (v, unit) = if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "us")
    } else {
        (ns, "ns")
    };
    format!("{}{unit}", v.round())
}

fn xml_escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_svg_has_one_box_per_series_and_escapes_labels() {
        let s = svg(&[
            Series {
                label: "a<b".into(),
                samples_ns: vec![100.0, 200.0],
            },
            Series {
                label: "c".into(),
                samples_ns: vec![5000.0],
            },
        ]);
        assert_eq!(s.matches("<rect x=").count(), 2);
        assert!(s.contains("a&lt;b"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains(">1us<") && s.contains(">100ns<"), "{s}");
    }
}
