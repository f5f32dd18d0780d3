//! Columns and formatters: rabbitmqctl's `table` (a header line, then one
//! tab-separated line per object), `tsv` (the same lines without the header) and
//! `json` (the API's objects, or only the chosen columns when columns are given).

use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Formatter {
    /// rabbitmqctl's default: a header line, then tab-separated values.
    Table,
    /// Tab-separated values without the header line or informational messages.
    Tsv,
    /// JSON: the API's objects (only the chosen columns when columns are given).
    Json,
}

/// What a listing shows: a column's name and where its value is in the API's
/// object: a key, a dotted path into nested objects, or "=text" for a constant.
pub struct Listing {
    pub command: &'static str,
    pub columns: &'static [(&'static str, &'static str)],
    pub default: &'static [&'static str],
}

impl Listing {
    /// The columns asked for, by name and path. Unknown names are refused, as
    /// rabbitmqctl refuses unknown info keys; a dotted name reaches into nested
    /// objects (e.g. `client_properties.product`).
    pub fn select(&self, asked: &[String]) -> Result<Vec<(String, String)>, String> {
        let names: Vec<&str> = if asked.is_empty() {
            self.default.to_vec()
        } else {
            asked.iter().map(String::as_str).collect()
        };
        let mut unknown = Vec::new();
        let mut out = Vec::new();
        for name in names {
            match self.columns.iter().find(|(n, _)| *n == name) {
                Some((n, path)) => out.push((n.to_string(), path.to_string())),
                None if name.contains('.') && !name.starts_with('.') && !name.ends_with('.') => {
                    out.push((name.to_string(), name.to_string()))
                }
                None => unknown.push(name),
            }
        }
        if !unknown.is_empty() {
            let known: Vec<&str> = self.columns.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "Info key(s) {} are not supported by {}; it accepts: {}",
                unknown.join(","),
                self.command,
                known.join(", ")
            ));
        }
        Ok(out)
    }
}

/// The value at `path` in `object` (Null where there is none).
pub fn lookup<'a>(object: &'a Value, path: &str) -> Value {
    if let Some(constant) = path.strip_prefix('=') {
        return Value::String(constant.to_string());
    }
    let mut v: &'a Value = object;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return Value::Null,
        }
    }
    v.clone()
}

/// A value as one cell of a tab-separated line: strings as they are (tabs, line
/// breaks and backslashes escaped so that a line stays one line), lists of plain
/// values as rabbitmqctl shows them ("[administrator]"), objects as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => escape(s),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(items) if items.iter().all(|i| !i.is_array() && !i.is_object()) => {
            let parts: Vec<String> = items.iter().map(cell).collect();
            format!("[{}]", parts.join(", "))
        }
        other => escape(&other.to_string()),
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// The lines of a listing in `table` or `tsv` form. An empty listing prints
/// nothing, header included, as rabbitmqctl's does.
pub fn lines(rows: &[Value], columns: &[(String, String)], header: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(rows.len() + 1);
    if rows.is_empty() {
        return out;
    }
    if header {
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        out.push(names.join("\t"));
    }
    for row in rows {
        let cells: Vec<String> = columns.iter().map(|(_, p)| cell(&lookup(row, p))).collect();
        out.push(cells.join("\t"));
    }
    out
}

/// The listing as JSON: the API's objects as they are, or, when columns were
/// asked for, objects of those columns alone (as rabbitmqctl's json formatter).
pub fn json(rows: Vec<Value>, columns: Option<&[(String, String)]>) -> Value {
    match columns {
        None => Value::Array(rows),
        Some(cols) => Value::Array(
            rows.iter()
                .map(|row| {
                    let m: Map<String, Value> = cols
                        .iter()
                        .map(|(n, p)| (n.clone(), lookup(row, p)))
                        .collect();
                    Value::Object(m)
                })
                .collect(),
        ),
    }
}

/// Bytes in a unit a person reads quickly.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const L: Listing = Listing {
        command: "list_things",
        columns: &[
            ("name", "name"),
            ("queue_name", "queue.name"),
            ("kind", "=exchange"),
        ],
        default: &["name"],
    };

    #[test]
    fn columns_are_chosen_by_name_path_or_refused() {
        assert_eq!(L.select(&[]).unwrap(), vec![("name".into(), "name".into())]);
        let asked = vec![
            "queue_name".to_string(),
            "client_properties.product".to_string(),
        ];
        assert_eq!(
            L.select(&asked).unwrap(),
            vec![
                ("queue_name".to_string(), "queue.name".to_string()),
                (
                    "client_properties.product".to_string(),
                    "client_properties.product".to_string()
                )
            ]
        );
        let err = L.select(&["nope".to_string()]).unwrap_err();
        assert!(
            err.starts_with("Info key(s) nope are not supported by list_things"),
            "{err}"
        );
    }

    #[test]
    fn cells_stay_on_one_line() {
        let row = json!({"name": "a\tb\nc\\", "queue": {"name": "q"}, "tags": ["administrator", "x"],
                         "args": {"x-max-length": 5}, "none": null, "n": 5, "b": true});
        let cols: Vec<(String, String)> = [
            "name",
            "queue.name",
            "tags",
            "args",
            "none",
            "n",
            "b",
            "=exchange",
        ]
        .iter()
        .map(|p| (p.to_string(), p.to_string()))
        .collect();
        let out = lines(&[row], &cols, true);
        assert_eq!(
            out[0],
            "name\tqueue.name\ttags\targs\tnone\tn\tb\t=exchange"
        );
        assert_eq!(
            out[1],
            "a\\tb\\nc\\\\\tq\t[administrator, x]\t{\"x-max-length\":5}\t\t5\ttrue\texchange"
        );
        assert!(lines(&[], &cols, true).is_empty());
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
