//! A run's per-epoch record (`metrics.jsonl`) and its plots (`knn.png`, `loss.png`).

use crate::io::write_atomic;
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::OnceLock;

/// One line of `metrics.jsonl`. Epoch 0 is the state before training (random weights).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Optimizer steps taken so far.
    pub step: usize,
    /// Mean training loss over the epoch.
    pub loss: Option<f64>,
    /// Learning rate and EMA rate at the epoch's last step.
    pub lr: Option<f64>,
    pub tau: Option<f64>,
    pub knn_top1: Option<f64>,
    pub knn_top5: Option<f64>,
    pub images_per_sec: Option<f64>,
    pub epoch_seconds: Option<f64>,
    /// Std of the L2-normalised online projections per dimension, averaged: about
    /// 1/sqrt(dim) when healthy, towards 0 when the representation collapses.
    pub projection_std: Option<f64>,
    pub peak_rss_mib: Option<f64>,
}

pub fn write_metrics(path: &Path, rows: &[EpochMetrics]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row)?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// Registers a system sans-serif font for plot text once; false when none is found, in which
/// case plots are drawn without text.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        const CANDIDATES: &[&str] = &[
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/Library/Fonts/Arial.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        CANDIDATES.iter().any(|path| {
            std::fs::read(path).ok().is_some_and(|bytes| {
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
                    .is_ok()
            })
        })
    })
}

/// A named, coloured line of (epoch, value) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// A line chart of `series` (name, colour, points) to a PNG, written atomically.
fn line_chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (y_min, y_max) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let text = font_available();
    let (width, height) = (800u32, 500u32);
    let mut buffer = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("cannot draw {}: {e}", path.display());
        root.fill(&WHITE).map_err(err)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if text {
            builder
                .caption(title, ("sans-serif", 24))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
            .map_err(err)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("epoch").y_desc(y_label);
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(err)?;
        for (name, colour, pts) in series {
            let drawn = chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(err)?;
            if text {
                drawn.label(*name).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            }
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(err)?;
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    let image = image::RgbImage::from_raw(width, height, buffer).context("plot buffer size")?;
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    write_atomic(path, &png)
}

/// The article's figure: kNN accuracy (%) against pretraining epochs.
pub fn plot_knn(path: &Path, rows: &[EpochMetrics]) -> Result<()> {
    let series = |get: fn(&EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| get(r).map(|v| (r.epoch as f64, 100.0 * v)))
            .collect()
    };
    line_chart(
        path,
        "kNN accuracy vs pretraining epochs",
        "kNN accuracy (%)",
        &[
            ("top-1", BLUE, series(|r| r.knn_top1)),
            ("top-5", RGBColor(230, 120, 0), series(|r| r.knn_top5)),
        ],
    )
}

/// One metric per epoch as a line chart.
fn plot_metric(
    path: &Path,
    title: &str,
    name: &str,
    rows: &[EpochMetrics],
    get: fn(&EpochMetrics) -> Option<f64>,
) -> Result<()> {
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| get(r).map(|v| (r.epoch as f64, v)))
        .collect();
    line_chart(path, title, name, &[(name, RED, points)])
}

pub fn plot_loss(path: &Path, rows: &[EpochMetrics]) -> Result<()> {
    plot_metric(path, "BYOL loss", "loss", rows, |r| r.loss)
}

/// All of a run's plots: `knn.png`, `loss.png`, `lr.png`, `tau.png`.
pub fn plot_all(run: &Path, rows: &[EpochMetrics]) -> Result<()> {
    plot_knn(&run.join("knn.png"), rows)?;
    plot_loss(&run.join("loss.png"), rows)?;
    plot_metric(
        &run.join("lr.png"),
        "learning rate (last step of each epoch)",
        "lr",
        rows,
        |r| r.lr,
    )?;
    plot_metric(
        &run.join("tau.png"),
        "EMA rate tau (last step of each epoch)",
        "tau",
        rows,
        |r| r.tau,
    )
}

/// A plain-text table of the run, one line per epoch.
pub fn summary_table(rows: &[EpochMetrics]) -> String {
    let cell = |v: Option<f64>, scale: f64, digits: usize| {
        v.map_or("-".to_string(), |v| format!("{:.*}", digits, v * scale))
    };
    let header = [
        "epoch", "step", "loss", "lr", "tau", "top-1%", "top-5%", "img/s", "seconds", "peak MiB",
    ];
    let mut out = header.map(|h| format!("{h:>9}")).join("") + "\n";
    for r in rows {
        let cells = [
            r.epoch.to_string(),
            r.step.to_string(),
            cell(r.loss, 1.0, 4),
            r.lr.map_or("-".into(), |v| format!("{v:.2e}")),
            cell(r.tau, 1.0, 4),
            cell(r.knn_top1, 100.0, 2),
            cell(r.knn_top5, 100.0, 2),
            cell(r.images_per_sec, 1.0, 1),
            cell(r.epoch_seconds, 1.0, 0),
            cell(r.peak_rss_mib, 1.0, 0),
        ];
        out += &(cells.map(|c| format!("{c:>9}")).join("") + "\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_round_trip_and_plots_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<EpochMetrics> = (0..3)
            .map(|e| EpochMetrics {
                epoch: e,
                step: e * 10,
                loss: (e > 0).then_some(1.0 / e as f64),
                knn_top1: Some(0.2 + 0.1 * e as f64),
                knn_top5: Some(0.6 + 0.1 * e as f64),
                lr: Some(0.1 / (e + 1) as f64),
                tau: Some(0.99),
                ..Default::default()
            })
            .collect();
        let path = dir.path().join("metrics.jsonl");
        write_metrics(&path, &rows).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), rows);
        plot_all(dir.path(), &rows).unwrap();
        let table = summary_table(&rows);
        assert_eq!(table.lines().count(), 4);
        assert!(
            table.lines().nth(1).unwrap().contains("  -  ")
                || table.lines().nth(1).unwrap().contains(" - ")
        );
        for name in ["knn.png", "loss.png", "lr.png", "tau.png"] {
            let img = image::open(dir.path().join(name)).unwrap();
            assert_eq!((img.width(), img.height()), (800, 500));
        }
    }
}
