//! SVG line charts of the bench's figures (plotters, SVG backend only: the
//! text is SVG text, drawn by whatever shows the file).

use std::path::Path;

use plotters::prelude::*;

/// One line of a chart: a label and its points, in x order.
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// A line chart of `series` with a logarithmic x axis (connection counts
/// grow by tens) and a linear y axis from zero, written to `path`.
pub(crate) fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    anyhow::ensure!(points().next().is_some(), "nothing to plot in {title}");
    let x_min = points().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = points().map(|p| p.0).fold(0.0, f64::max);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());

    let root = SVGBackend::new(path, (860, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(84)
        .build_cartesian_2d(
            (x_min / 1.5..x_max * 1.5).log_scale(),
            0.0..(y_max * 1.15).max(f64::MIN_POSITIVE),
        )
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short(*y))
        .draw()
        .map_err(|e| failed(&e))?;
    for (i, s) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.points.clone(), colour.stroke_width(2)))
            .map_err(|e| failed(&e))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(|e| failed(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

/// `y` with a k/M suffix, for axis labels.
fn short(y: f64) -> String {
    if y >= 1e6 {
        format!("{:.1}M", y / 1e6)
    } else if y >= 1e3 {
        format!("{:.0}k", y / 1e3)
    } else {
        format!("{y:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_written_as_svg_with_its_labels() {
        let dir = rt_tests::TempDir::new();
        let path = dir.0.join("chart.svg");
        let series = [
            Series {
                label: "raw p99".to_owned(),
                points: vec![(1000.0, 9.0), (10000.0, 150.0)],
            },
            Series {
                label: "sse p99".to_owned(),
                points: vec![(1000.0, 15.0), (10000.0, 250.0)],
            },
        ];
        lines(&path, "latency p99", "connections", "ms", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for text in ["latency p99", "raw p99", "sse p99", "connections"] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = rt_tests::TempDir::new();
        let err = lines(&dir.0.join("x.svg"), "empty", "x", "y", &[]).unwrap_err();
        assert!(err.to_string().contains("nothing to plot"), "{err}");
    }
}
