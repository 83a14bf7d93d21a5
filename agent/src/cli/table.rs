//! Output: `--json` or aligned tables that fit the terminal.

use super::*;

/// Set once at start: tables cut long cells only for a person at a terminal with `-o table`.
pub(super) static CUT_CELLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A reply as JSON (`--json`), or as `human` prints it.
pub(super) fn show<T: serde::Serialize>(v: &T, as_json: bool, human: impl FnOnce(&T)) {
    if as_json { print_json(v) } else { human(v) }
}

pub(super) fn print_json<T: serde::Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A duration for a person: milliseconds when short, else the largest units.
pub(super) fn ms(n: u64) -> String {
    if n < 10_000 {
        format!("{n}ms")
    } else {
        humantime::format_duration(Duration::from_secs(n / 1000)).to_string()
    }
}

/// Prints an aligned table; long cells are cut so rows stay on one line.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) {
    const MAX_CELL: usize = 80;
    let cut_cells = CUT_CELLS.load(std::sync::atomic::Ordering::Relaxed);
    let cut = |c: &str| -> String {
        let one_line = c.replace('\n', " ");
        if cut_cells && one_line.chars().count() > MAX_CELL {
            one_line.chars().take(MAX_CELL - 1).collect::<String>() + "…"
        } else {
            one_line
        }
    };
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| cut(c)).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        println!("(none)");
    }
}
