//! JSON text as Python's `json.dumps(obj, ensure_ascii=False)` writes it (`", "` between items,
//! `": "` after keys). Tool declarations reach the prompt in this form because that is what the
//! Phi-4 model card and transformers users feed the template; key order is kept as given.

use serde::Serialize;
use serde_json::ser::Formatter;
use std::io;

struct PyFormatter;

impl Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// `json.dumps(value, ensure_ascii=False)`.
pub fn dumps<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    value
        .serialize(&mut ser)
        .expect("serializing a JSON value to memory cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_python_separators() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b": [1, {"x": null}], "a": "ü\"", "c": true}"#).unwrap();
        assert_eq!(
            super::dumps(&v),
            r#"{"b": [1, {"x": null}], "a": "ü\"", "c": true}"#
        );
    }
}
