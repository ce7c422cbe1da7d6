//! `kiln plot`: train (solid) and eval (dashed) loss curves of a sweep's variants on one SVG
//! chart, labelled by the values that differ between them. Written by hand: an SVG is text.
//! PNG output rasterizes that same SVG with resvg, so both formats show the same chart.

use crate::scheduler::State;
use crate::workspace::{KilnError, Workspace};

/// One variant's curves.
pub struct Series {
    pub label: String,
    pub train: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
}

/// The curves of every built variant, from the index's metrics.
pub fn series(ws: &Workspace) -> Result<Vec<Series>, KilnError> {
    let st = ws.scheduler().assess()?;
    let mut out = Vec::new();
    for v in &ws.variants {
        let Some(key) = v.stage("train").and_then(|n| {
            st.iter()
                .find(|s| s.name == n && s.state == State::Fresh)
                .and_then(|s| s.key.clone())
        }) else {
            continue;
        };
        let ms = ws.index.metrics(&key)?;
        let pick = |name: &str| {
            let mut v: Vec<(f64, f64)> = ms
                .iter()
                .filter(|(_, n, _)| n == name)
                .map(|(s, _, x)| (*s as f64, *x))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v.dedup_by(|a, b| a.0 == b.0);
            v
        };
        let label = if v.label.is_empty() {
            "train".to_string()
        } else {
            v.label.clone()
        };
        out.push(Series {
            label,
            train: pick("loss"),
            eval: pick("eval_loss"),
        });
    }
    Ok(out)
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Round tick values (1, 2 or 5 × 10^k apart) inside `[lo, hi]`, at most about `n` of them;
/// whole numbers only when `integer` (training steps).
fn ticks(lo: f64, hi: f64, n: usize, integer: bool) -> Vec<f64> {
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    if integer {
        step = step.max(1.0).round();
    }
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A y tick's label with as many decimals as the axis range needs.
fn tick_label(v: f64, range: f64) -> String {
    let decimals = (-(range / 6.0).log10().floor()).clamp(0.0, 6.0) as usize + 1;
    format!("{v:.decimals$}")
}

/// Renders the series as an SVG document.
pub fn svg(series: &[Series], title: &str) -> String {
    let (w, h) = (900.0, 520.0);
    let (left, right, top, bottom) = (70.0, 260.0, 40.0, 50.0);
    let pts = series.iter().flat_map(|s| s.train.iter().chain(&s.eval));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"24\" font-size=\"15\">{}</text>\n",
        esc(title)
    );
    // Axes and ticks.
    o.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#333\"/>\n",
        top + ph,
        left + pw,
        top + ph,
        top + ph
    ));
    for yv in ticks(y0, y1, 6, false) {
        o.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{r:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{tx:.1}\" y=\"{ty:.1}\" text-anchor=\"end\">{}</text>\n",
            tick_label(yv, y1 - y0),
            y = sy(yv),
            r = left + pw,
            tx = left - 6.0,
            ty = sy(yv) + 4.0,
        ));
    }
    for xv in ticks(x0, x1, 8, true) {
        o.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{b:.1}\" x2=\"{x:.1}\" y2=\"{b2:.1}\" stroke=\"#333\"/><text x=\"{x:.1}\" y=\"{xy:.1}\" text-anchor=\"middle\">{xv:.0}</text>\n",
            x = sx(xv),
            b = top + ph,
            b2 = top + ph + 4.0,
            xy = top + ph + 18.0,
        ));
    }
    o.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\n<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">loss</text>\n",
        left + pw / 2.0,
        h - 10.0,
        top + ph / 2.0,
        top + ph / 2.0
    ));
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        for (pts, dash) in [(&s.train, ""), (&s.eval, " stroke-dasharray=\"6 4\"")] {
            let path: Vec<String> = pts
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            if path.len() == 1 {
                o.push_str(&format!(
                    "<circle cx=\"{}\" r=\"3\" fill=\"{c}\"/>\n",
                    path[0].replace(',', "\" cy=\"")
                ));
            } else if !path.is_empty() {
                o.push_str(&format!(
                    "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
                    path.join(" ")
                ));
            }
        }
        let ly = top + 14.0 + i as f64 * 18.0;
        let lx = left + pw + 16.0;
        o.push_str(&format!(
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&s.label)
        ));
    }
    let ly = top + 14.0 + series.len() as f64 * 18.0 + 8.0;
    o.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{ly:.1}\" fill=\"#666\">solid: train loss; dashed: eval loss</text>\n</svg>\n",
        left + pw + 16.0
    ));
    o
}

/// Why a chart could not be rasterized.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("no fonts found on this system for the chart's labels; install some (Debian: `apt install fonts-dejavu-core`) or write .svg instead")]
    NoFonts,
    #[error("rendering the chart: {0}")]
    Render(String),
}

/// Rasterizes an SVG chart (from [`svg`]) to PNG bytes at `scale`× its size, drawing its text with
/// the system's sans-serif font.
pub fn png(svg: &str, scale: f32) -> Result<Vec<u8>, PlotError> {
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    if db.is_empty() {
        return Err(PlotError::NoFonts);
    }
    // The chart asks for `sans-serif`; fontconfig's alias may name a font that isn't installed
    // (fontdb then draws no text at all), so point it at one that is.
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(n, _)| n.clone()))
        .collect();
    let sans = db
        .family_name(&resvg::usvg::fontdb::Family::SansSerif)
        .to_string();
    if !families.contains(&sans) {
        let pick = [
            "DejaVu Sans",
            "Noto Sans",
            "Liberation Sans",
            "Arial",
            "Helvetica",
        ]
        .iter()
        .map(|s| s.to_string())
        .find(|f| families.contains(f))
        .or_else(|| families.iter().find(|f| f.contains("Sans")).cloned())
        .or_else(|| families.first().cloned());
        if let Some(f) = pick {
            db.set_sans_serif_family(f);
        }
    }
    let tree =
        resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| PlotError::Render(e.to_string()))?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(scale)
        .ok_or_else(|| PlotError::Render(format!("bad scale {scale}")))?;
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| PlotError::Render("empty chart".into()))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| PlotError::Render(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(ticks(1.0, 2.0, 8, true), vec![1.0, 2.0]);
        assert_eq!(
            ticks(0.0, 100.0, 5, true),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        let t: Vec<String> = ticks(6.67, 7.63, 6, false)
            .iter()
            .map(|v| tick_label(*v, 0.96))
            .collect();
        assert_eq!(t, ["6.80", "7.00", "7.20", "7.40", "7.60"]);
        assert_eq!(tick_label(7.2, 0.96), "7.20");
    }
}
