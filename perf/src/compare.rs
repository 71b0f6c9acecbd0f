//! `iris-perf compare A.json B.json`: every numeric field the two reports
//! share, side by side, with the ratio B / A.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Flattens numeric leaves of `value` into dotted keys.
fn numbers(prefix: &str, value: &Value, out: &mut BTreeMap<String, f64>) {
    match value {
        Value::Number(number) => {
            if let Some(number) = number.as_f64() {
                out.insert(prefix.to_string(), number);
            }
        }
        Value::Object(map) => {
            for (key, value) in map {
                let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                numbers(&key, value, out);
            }
        }
        _ => {}
    }
}

fn load(path: &Path) -> Result<(String, BTreeMap<String, f64>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not a report: {e}", path.display()))?;
    let label =
        value.get("label").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| path.display().to_string());
    let mut out = BTreeMap::new();
    numbers("", &value, &mut out);
    Ok((label, out))
}

/// Prints the comparison table.
pub fn run(a: &Path, b: &Path) -> Result<(), String> {
    let (label_a, a) = load(a)?;
    let (label_b, b) = load(b)?;
    let shared: Vec<&String> = a.keys().filter(|key| b.contains_key(*key)).collect();
    if shared.is_empty() {
        return Err("the reports share no numeric fields".into());
    }
    let width = shared.iter().map(|key| key.len()).max().unwrap_or(10).max(10);
    println!("{:<width$}  {:>16}  {:>16}  {:>8}", "field", label_a, label_b, "B/A");
    for key in shared {
        let (x, y) = (a[key], b[key]);
        let ratio = if x != 0.0 { format!("{:.3}", y / x) } else { "-".into() };
        println!("{key:<width$}  {x:>16.2}  {y:>16.2}  {ratio:>8}");
    }
    Ok(())
}
