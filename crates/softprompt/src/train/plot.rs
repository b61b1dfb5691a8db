//! `OUTPUT/loss.svg` and `OUTPUT/loss.png`: the training loss (raw and smoothed) and the dev
//! loss against the step, and the dev accuracy (right axis, 0-1) when it was measured.
//!
//! Text is laid out (both files) and rasterised (PNG) with a font embedded in the binary
//! (DejaVu Sans, `assets/fonts/`, Bitstream Vera license), so plotting needs no system font and
//! no C library. The PNG is encoded in memory and written atomically, like the SVG.

use crate::fsutil::write_atomic;
use crate::train::metrics::StepMetrics;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

pub const FILE: &str = "loss.svg";
/// Size of both images, in pixels.
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 540;

/// The font every label is drawn with, registered as plotters' `sans-serif`.
static FONT: &[u8] = include_bytes!("../../../../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("plot: the embedded font cannot be parsed"))
    }
}

/// Weight of the newest point in the smoothed training curve (an exponential moving average).
const SMOOTHING: f64 = 0.1;

/// Draws `rows` into `path` (SVG) and into `path` with the extension `png` (a [`WIDTH`] x
/// [`HEIGHT`] RGB PNG), both written atomically. Nothing is drawn from an empty log; the axis
/// ranges ignore non-finite values.
pub fn plot_loss(rows: &[StepMetrics], path: &Path) -> Result<()> {
    register_font()?;
    let train: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let dev: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            r.dev_loss
                .filter(|d| d.is_finite())
                .map(|d| (r.step as f64, d))
        })
        .collect();
    let accuracy: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            r.dev_accuracy
                .filter(|a| a.is_finite())
                .map(|a| (r.step as f64, a))
        })
        .collect();
    let mut smooth = Vec::with_capacity(train.len());
    let mut ema: Option<f64> = None;
    for &(x, y) in &train {
        let v = match ema {
            None => y,
            Some(e) => e + SMOOTHING * (y - e),
        };
        ema = Some(v);
        smooth.push((x, v));
    }
    let xs = train.iter().chain(&dev).map(|p| p.0);
    let ys = train.iter().chain(&dev).map(|p| p.1);
    let x_max = xs.fold(1.0f64, f64::max);
    let y_max = ys.clone().fold(f64::NEG_INFINITY, f64::max);
    let y_min = ys.fold(f64::INFINITY, f64::min);
    let (y_lo, y_hi) = if y_max.is_finite() && y_min.is_finite() {
        let pad = ((y_max - y_min) * 0.05).max(1e-3);
        ((y_min - pad).max(0.0), y_max + pad)
    } else {
        (0.0, 1.0)
    };

    let curves = Curves {
        train,
        smooth,
        dev,
        accuracy,
        x_max,
        y_lo,
        y_hi,
    };
    let err = |e: &dyn std::fmt::Display| Error::format(path, format!("plot: {e}"));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, &curves).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    write_atomic(path, svg.as_bytes())?;

    let png_path = path.with_extension("png");
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, &curves).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    let png = encode_png(&rgb, WIDTH, HEIGHT)
        .map_err(|e| Error::format(&png_path, format!("plot: PNG encoding: {e}")))?;
    write_atomic(&png_path, &png)
}

/// The points of a plot and its axis ranges.
struct Curves {
    train: Vec<(f64, f64)>,
    smooth: Vec<(f64, f64)>,
    dev: Vec<(f64, f64)>,
    /// Dev accuracy (a fraction), drawn against the right axis.
    accuracy: Vec<(f64, f64)>,
    x_max: f64,
    y_lo: f64,
    y_hi: f64,
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draws the chart on `root` (any backend).
fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Curves) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let with_accuracy = !c.accuracy.is_empty();
    let mut chart = ChartBuilder::on(root)
        .caption(
            if with_accuracy {
                "training loss (mean target-token NLL) and dev accuracy"
            } else {
                "training loss (mean target-token NLL)"
            },
            ("sans-serif", 22),
        )
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .right_y_label_area_size(if with_accuracy { 70 } else { 0 })
        .build_cartesian_2d(0f64..c.x_max, c.y_lo..c.y_hi)?
        .set_secondary_coord(0f64..c.x_max, 0f64..1f64);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let light = RGBColor(150, 180, 230);
    chart
        .draw_series(LineSeries::new(c.train.iter().copied(), light.stroke_width(1)))?
        .label("train")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light));
    chart
        .draw_series(LineSeries::new(c.smooth.iter().copied(), BLUE.stroke_width(2)))?
        .label("train (smoothed)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !c.dev.is_empty() {
        chart
            .draw_series(LineSeries::new(c.dev.iter().copied(), RED.stroke_width(2)))?
            .label("dev loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart.draw_series(c.dev.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    }
    if with_accuracy {
        let green = RGBColor(0, 140, 60);
        chart
            .configure_secondary_axes()
            .y_desc("dev accuracy")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        chart
            .draw_secondary_series(LineSeries::new(
                c.accuracy.iter().copied(),
                green.stroke_width(2),
            ))?
            .label("dev accuracy (right axis)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2))
            });
        chart.draw_secondary_series(
            c.accuracy
                .iter()
                .map(|&p| Circle::new(p, 3, green.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// An 8-bit RGB image `[height, width, 3]` as the bytes of a PNG file.
fn encode_png(rgb: &[u8], width: u32, height: u32) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
    }
    Ok(bytes)
}
