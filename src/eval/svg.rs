//! The scaling chart as a standalone SVG, written by hand: x = number of merged tasks k,
//! y = normalised accuracy (%), one line per method (a `<path>`) with its 95% confidence band
//! (a `<polygon>`), axes, ticks and a legend.
//!
//! Step in the data flow: last, beside the markdown and JSON reports.

use std::fmt::Write as _;

use super::report::ScalingSeries;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// Escapes text for XML content and attribute values.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Maps data coordinates to pixels.
struct Frame {
    k_min: f64,
    k_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Frame {
    fn fit(series: &[ScalingSeries]) -> Self {
        let points = || series.iter().flat_map(|s| s.points.iter());
        let ks = points().map(|p| p.k as f64);
        let k_min = ks.clone().fold(f64::INFINITY, f64::min);
        let k_max = ks.fold(f64::NEG_INFINITY, f64::max);
        let lo = points()
            .map(|p| p.normalized.lo)
            .fold(f64::INFINITY, f64::min);
        let hi = points()
            .map(|p| p.normalized.hi)
            .fold(f64::NEG_INFINITY, f64::max);
        let (k_min, k_max) = if k_min.is_finite() {
            (k_min, k_max)
        } else {
            (1.0, 2.0)
        };
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        // Percent axis rounded out to tens.
        let y_min = ((100.0 * lo) / 10.0).floor() * 10.0;
        let y_max = (((100.0 * hi) / 10.0).ceil() * 10.0).max(y_min + 10.0);
        Self {
            k_min,
            k_max: if k_max > k_min { k_max } else { k_min + 1.0 },
            y_min,
            y_max,
        }
    }

    fn x(&self, k: f64) -> f64 {
        LEFT + (k - self.k_min) / (self.k_max - self.k_min) * (WIDTH - LEFT - RIGHT)
    }

    /// `value` is a fraction; the axis is in percent.
    fn y(&self, value: f64) -> f64 {
        let pct = 100.0 * value;
        HEIGHT - BOTTOM - (pct - self.y_min) / (self.y_max - self.y_min) * (HEIGHT - TOP - BOTTOM)
    }
}

/// Renders the scaling chart of `series` (one line per method).
pub fn scaling_svg(series: &[ScalingSeries]) -> String {
    let f = Frame::fit(series);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    axes(&mut svg, &f);
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        band_and_line(&mut svg, &f, s, color);
        let y = TOP + 20.0 * i as f64;
        let lx = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 25.0,
            y + 4.0,
            escape(&s.method)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn axes(svg: &mut String, f: &Frame) {
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (HEIGHT - BOTTOM, TOP);
    let _ = writeln!(
        svg,
        r#"<polyline class="axis" points="{x0},{y1} {x0},{y0} {x1},{y0}" fill="none" stroke="black"/>"#
    );
    let mut k = f.k_min;
    while k <= f.k_max + 1e-9 {
        let x = f.x(k);
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{k}</text>"#,
            y0 + 5.0,
            y0 + 18.0
        );
        k += 1.0;
    }
    let mut pct = f.y_min;
    while pct <= f.y_max + 1e-9 {
        let y = f.y(pct / 100.0);
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{y:.1}" x2="{x0}" y2="{y:.1}" stroke="black"/><text x="{}" y="{:.1}" text-anchor="end">{pct}</text>"#,
            x0 - 5.0,
            x0 - 8.0,
            y + 4.0
        );
        pct += 10.0;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">number of merged tasks (k)</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">normalised accuracy (%)</text>"#,
        (y0 + y1) / 2.0
    );
}

fn band_and_line(svg: &mut String, f: &Frame, s: &ScalingSeries, color: &str) {
    let mut points = s.points.clone();
    points.sort_by_key(|p| p.k);
    let upper = points
        .iter()
        .map(|p| (f.x(p.k as f64), f.y(p.normalized.hi)));
    let lower = points
        .iter()
        .rev()
        .map(|p| (f.x(p.k as f64), f.y(p.normalized.lo)));
    let band: Vec<String> = upper
        .chain(lower)
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let method = escape(&s.method);
    let _ = writeln!(
        svg,
        r#"<polygon class="band" data-method="{method}" points="{}" fill="{color}" fill-opacity="0.15" stroke="none"/>"#,
        band.join(" ")
    );
    let d: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let cmd = if i == 0 { 'M' } else { 'L' };
            format!("{cmd}{:.1},{:.1}", f.x(p.k as f64), f.y(p.normalized.mean))
        })
        .collect();
    let _ = writeln!(
        svg,
        r#"<path class="line" data-method="{method}" d="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
        d.join(" ")
    );
}
