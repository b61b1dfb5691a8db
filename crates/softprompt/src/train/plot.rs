//! `OUTPUT/loss.svg`: the training loss (raw and smoothed) and the dev loss against the step.
//!
//! SVG only: plotters' PNG backend needs a TrueType font for its labels, which would have to be
//! found on the system at run time; the SVG backend writes text elements and needs none.

use crate::fsutil::write_atomic;
use crate::train::metrics::StepMetrics;
use crate::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

pub const FILE: &str = "loss.svg";

/// Weight of the newest point in the smoothed training curve (an exponential moving average).
const SMOOTHING: f64 = 0.1;

/// Draws `rows` into `path` (written atomically). Nothing is drawn from an empty log; the axis
/// ranges ignore non-finite values.
pub fn plot_loss(rows: &[StepMetrics], path: &Path) -> Result<()> {
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

    let mut svg = String::new();
    {
        let err = |e: &dyn std::fmt::Display| Error::format(path, format!("plot: {e}"));
        let root = SVGBackend::with_string(&mut svg, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "prompt tuning loss (mean target-token NLL)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, y_lo..y_hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(&e))?;
        let light = RGBColor(150, 180, 230);
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                light.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label("train")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light));
        chart
            .draw_series(LineSeries::new(
                smooth.iter().copied(),
                BLUE.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("train (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !dev.is_empty() {
            chart
                .draw_series(LineSeries::new(dev.iter().copied(), RED.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label("dev")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .draw_series(dev.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    write_atomic(path, svg.as_bytes())
}
