//! An SVG plot of the latency distributions, configurations side by side: one
//! box per series (box p25–p75, line at the median, whiskers p1–p99, a dot
//! at the maximum) on a logarithmic latency axis, drawn with `plotters`' SVG
//! backend. The series are plain data: this module knows no report.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::stats::{fmt_ns, Latencies};

/// One box of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    /// Label under the box.
    pub label: String,
    /// Latencies in ns.
    pub samples_ns: Vec<f64>,
}

/// Drawing the plot failed.
#[derive(Debug, thiserror::Error)]
#[error("drawing the plot: {0}")]
pub struct PlotError(String);

/// Width of one series' column, pixels.
const COLUMN: u32 = 70;
/// Height of the plotting area, pixels.
const HEIGHT: u32 = 360;
/// Room for the rotated labels under the boxes, pixels.
const LABELS: u32 = 190;
/// Room for the latency axis labels, pixels.
const AXIS: u32 = 60;
/// Fewest columns (boxes or room for them) of a plot.
const MIN_COLUMNS: usize = 8;

const COLORS: [RGBColor; 8] = [
    RGBColor(0x48, 0x78, 0xd0),
    RGBColor(0xee, 0x85, 0x4a),
    RGBColor(0x6a, 0xcc, 0x64),
    RGBColor(0xd6, 0x5f, 0x5f),
    RGBColor(0x95, 0x6c, 0xb4),
    RGBColor(0x8c, 0x61, 0x3c),
    RGBColor(0xdc, 0x7e, 0xc0),
    RGBColor(0x79, 0x79, 0x79),
];

/// p1, p25, p50, p75, p99 and max of the positive samples.
fn box_stats(samples: &[f64]) -> [f64; 6] {
    let positive: Vec<f64> = samples.iter().copied().filter(|x| *x > 0.0).collect();
    let h = Latencies::new(&positive);
    let max = positive.iter().copied().fold(0.0, f64::max);
    [
        h.quantile(0.01),
        h.quantile(0.25),
        h.quantile(0.5),
        h.quantile(0.75),
        h.quantile(0.99),
        max,
    ]
}

/// The latency axis: whole decades around every box, 1 ns to 1 ms if none.
fn decades(stats: &[[f64; 6]]) -> (f64, f64) {
    let lo = stats
        .iter()
        .map(|s| s[0])
        .filter(|x| *x > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = stats.iter().map(|s| s[5]).fold(0.0, f64::max);
    if lo.is_finite() && hi > lo {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    } else {
        (1.0, 1e6)
    }
}

/// Renders `series` as an SVG document.
pub fn svg(series: &[Series]) -> Result<String, PlotError> {
    let mut out = String::new();
    draw(series, &mut out).map_err(|e| PlotError(e.to_string()))?;
    Ok(out)
}

fn draw<'a>(series: &[Series], out: &'a mut String) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let n = series.len().max(1);
    let stats: Vec<[f64; 6]> = series.iter().map(|s| box_stats(&s.samples_ns)).collect();
    let (lo, hi) = decades(&stats);
    // Wide enough for the caption: at least MIN_COLUMNS columns.
    let columns = n.max(MIN_COLUMNS);
    let size = (AXIS + COLUMN * columns as u32 + 20, HEIGHT + LABELS + 40);
    let root = SVGBackend::with_string(out, size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "guest page-fault latency per access (log scale; box p25-p75, whiskers p1-p99, dot max)",
            ("sans-serif", 13),
        )
        .margin(10)
        .x_label_area_size(LABELS)
        .y_label_area_size(AXIS)
        .build_cartesian_2d(-0.5..columns as f64 - 0.5, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_max_light_lines(1)
        .x_labels(0)
        .y_label_formatter(&|ns| axis_label(*ns))
        .y_desc("latency")
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .draw()?;
    // Labels under the boxes, reading downwards from the axis (the mesh
    // centres its labels on the tick, which suits no long rotated text).
    let label_style = ("sans-serif", 11)
        .into_font()
        .transform(FontTransform::Rotate90)
        .into_text_style(&root)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (s, st)) in series.iter().zip(&stats).enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64, lo));
        let label = format!("{} ({})", s.label, fmt_ns(st[2]));
        root.draw(&Text::new(label, (x, y + 8), label_style.clone()))?;
    }
    for (i, st) in stats.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let [p1, p25, p50, p75, p99, max] = st.map(|v| v.max(lo));
        let (x, left, right) = (i as f64, i as f64 - 0.3, i as f64 + 0.3);
        chart.draw_series([PathElement::new([(x, p1), (x, p99)], color)])?;
        chart.draw_series([
            Rectangle::new([(left, p75), (right, p25)], color.mix(0.35).filled()),
            Rectangle::new([(left, p75), (right, p25)], color.stroke_width(1)),
        ])?;
        chart.draw_series([PathElement::new(
            [(left, p50), (right, p50)],
            BLACK.stroke_width(2),
        )])?;
        chart.draw_series([Circle::new((x, max), 3, color.filled())])?;
    }
    root.present()?;
    Ok(())
}

/// `10ns`, `1us`, `100ms`: decades without decimals; other ticks unlabelled.
fn axis_label(ns: f64) -> String {
    let decade = 10f64.powf(ns.log10().round());
    if (ns - decade).abs() > decade * 1e-6 {
        return String::new();
    }
    let (v, unit) = if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "us")
    } else {
        (ns, "ns")
    };
    format!("{}{unit}", v.round())
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
        ])
        .unwrap();
        assert_eq!(s.matches("opacity=\"0.35\"").count(), 2, "{s}");
        assert!(s.contains("a&lt;b"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("\n1us\n") && s.contains("\n100ns\n"), "{s}");
    }

    #[test]
    fn test_axis_labels_only_whole_decades() {
        assert_eq!(axis_label(1000.0), "1us");
        assert_eq!(axis_label(100.0), "100ns");
        assert_eq!(axis_label(2e6), "");
    }
}
