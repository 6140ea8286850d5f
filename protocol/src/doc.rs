//! The JSON view of an Automerge document: read the whole document as JSON,
//! put a JSON value at a JSON-pointer path (RFC 6901), delete at a path.
//!
//! JSON objects become Automerge maps, arrays become lists, strings become
//! scalar strings (last writer wins), integers stay integers. Automerge text
//! objects and counters read back as strings and numbers.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::{Map, Number, Value as Json};

use crate::error::{Error, Result};

/// Drops the patches automerge 0.12 records while it applies remote
/// changes. Applying changes (directly or from a sync message) logs an
/// event, with a copy of the value, for every map key they touch, even
/// when nobody asked for patches; only this call empties the log. Without
/// it a document keeps a copy of every value it ever received: 10,000
/// index entries took 5.7 MB instead of 1.7 MB. Call it after every apply.
pub fn forget_patches(doc: &mut AutoCommit) {
    doc.reset_diff_cursor();
}

/// Deepest JSON nesting accepted in a put.
pub const MAX_DEPTH: usize = 64;

/// The whole document as JSON.
pub fn to_json(doc: &impl ReadDoc) -> Json {
    obj_to_json(doc, &ROOT, ObjType::Map, 0)
}

/// Deepest nesting read back; deeper objects (only a hostile peer writes
/// them, local puts stop at [`MAX_DEPTH`]) read as null instead of
/// overflowing the stack.
pub const MAX_READ_DEPTH: usize = 2 * MAX_DEPTH;

fn obj_to_json(doc: &impl ReadDoc, obj: &ObjId, ty: ObjType, depth: usize) -> Json {
    if depth > MAX_READ_DEPTH {
        return Json::Null;
    }
    match ty {
        ObjType::Map | ObjType::Table => {
            let mut m = Map::new();
            for k in doc.keys(obj) {
                if let Ok(Some((v, id))) = doc.get(obj, k.as_str()) {
                    m.insert(k, value_to_json(doc, v, &id, depth));
                }
            }
            Json::Object(m)
        }
        ObjType::List => Json::Array(
            (0..doc.length(obj))
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(v, id)| value_to_json(doc, v, &id, depth))
                .collect(),
        ),
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

fn value_to_json(doc: &impl ReadDoc, v: Value<'_>, id: &ObjId, depth: usize) -> Json {
    match v {
        Value::Object(ty) => obj_to_json(doc, id, ty, depth + 1),
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => Json::String(s.to_string()),
            ScalarValue::Int(i) => Json::from(*i),
            ScalarValue::Uint(u) => Json::from(*u),
            ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
            ScalarValue::Counter(c) => Json::from(i64::from(c)),
            ScalarValue::Timestamp(t) => Json::from(*t),
            ScalarValue::Boolean(b) => Json::Bool(*b),
            ScalarValue::Bytes(b) => Json::String(hex::encode(b)),
            ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
        },
    }
}

/// Splits a JSON pointer into unescaped tokens. `""` is the root.
pub fn parse_pointer(path: &str) -> Result<Vec<String>> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad(
            path,
            "a JSON pointer starts with '/' (or is empty for the root)",
        ));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn bad(path: &str, reason: &str) -> Error {
    Error::BadPath {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

/// Where a token points inside its container.
enum Slot {
    Key(String),
    /// An existing list index.
    Index(usize),
    /// One past the end of a list (`-` or the length): append.
    Append,
}

fn slot(doc: &AutoCommit, obj: &ObjId, token: &str, path: &str) -> Result<Slot> {
    match doc.object_type(obj)? {
        ObjType::Map | ObjType::Table => Ok(Slot::Key(token.to_string())),
        ObjType::List => {
            let len = doc.length(obj);
            if token == "-" {
                return Ok(Slot::Append);
            }
            let i: usize = token
                .parse()
                .map_err(|_| bad(path, &format!("{token:?} is not a list index")))?;
            match i.cmp(&len) {
                std::cmp::Ordering::Less => Ok(Slot::Index(i)),
                std::cmp::Ordering::Equal => Ok(Slot::Append),
                std::cmp::Ordering::Greater => Err(bad(
                    path,
                    &format!("index {i} is past the end of a list of {len}"),
                )),
            }
        }
        ObjType::Text => Err(bad(path, "cannot descend into text")),
    }
}

/// Puts `value` at `path`, creating missing intermediate objects as maps.
/// Putting at the root replaces every key with those of `value` (an object).
pub fn put_json(doc: &mut AutoCommit, path: &str, value: &Json) -> Result<()> {
    if depth(value) > MAX_DEPTH {
        return Err(bad(path, "value nested too deeply"));
    }
    let tokens = parse_pointer(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        let Json::Object(m) = value else {
            return Err(bad(path, "the document root must be a JSON object"));
        };
        for k in doc.keys(ROOT).collect::<Vec<_>>() {
            if !m.contains_key(&k) {
                doc.delete(ROOT, k.as_str())?;
            }
        }
        for (k, v) in m {
            put_at(doc, &ROOT, Slot::Key(k.clone()), v)?;
        }
        return Ok(());
    };
    let mut obj = ROOT;
    for (j, t) in parents.iter().enumerate() {
        // A missing container becomes a list when the next token indexes one.
        let next = tokens.get(j + 1).map(String::as_str).unwrap_or("");
        let new_ty = if next == "-" || next.parse::<usize>().is_ok() {
            ObjType::List
        } else {
            ObjType::Map
        };
        obj = match slot(doc, &obj, t, path)? {
            Slot::Key(k) => match doc.get(&obj, k.as_str())? {
                Some((Value::Object(_), id)) => id,
                Some(_) => return Err(bad(path, &format!("{t:?} is not an object or list"))),
                None => doc.put_object(&obj, k.as_str(), new_ty)?,
            },
            Slot::Index(i) => match doc.get(&obj, i)? {
                Some((Value::Object(_), id)) => id,
                _ => return Err(bad(path, &format!("item {i} is not an object or list"))),
            },
            Slot::Append => {
                let len = doc.length(&obj);
                doc.insert_object(&obj, len, new_ty)?
            }
        };
    }
    let s = slot(doc, &obj, last, path)?;
    put_at(doc, &obj, s, value)
}

fn put_at(doc: &mut AutoCommit, obj: &ObjId, slot: Slot, value: &Json) -> Result<()> {
    let ty = match value {
        Json::Object(_) => Some(ObjType::Map),
        Json::Array(_) => Some(ObjType::List),
        _ => None,
    };
    let Some(ty) = ty else {
        let s = scalar(value);
        match slot {
            Slot::Key(k) => doc.put(obj, k.as_str(), s)?,
            Slot::Index(i) => doc.put(obj, i, s)?,
            Slot::Append => {
                let len = doc.length(obj);
                doc.insert(obj, len, s)?
            }
        }
        return Ok(());
    };
    let child = match slot {
        Slot::Key(k) => doc.put_object(obj, k.as_str(), ty)?,
        Slot::Index(i) => doc.put_object(obj, i, ty)?,
        Slot::Append => {
            let len = doc.length(obj);
            doc.insert_object(obj, len, ty)?
        }
    };
    match value {
        Json::Object(m) => {
            for (k, v) in m {
                put_at(doc, &child, Slot::Key(k.clone()), v)?;
            }
        }
        Json::Array(items) => {
            for v in items {
                put_at(doc, &child, Slot::Append, v)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn scalar(v: &Json) -> ScalarValue {
    match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => ScalarValue::Null,
    }
}

fn depth(v: &Json) -> usize {
    match v {
        Json::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Json::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Deletes the value at `path` (not the root). Deleting a missing key is not
/// an error; a path through a missing object is.
pub fn delete_at(doc: &mut AutoCommit, path: &str) -> Result<()> {
    let tokens = parse_pointer(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        return Err(bad(path, "cannot delete the root"));
    };
    let mut obj = ROOT;
    for t in parents {
        let next = match slot(doc, &obj, t, path)? {
            Slot::Key(k) => doc.get(&obj, k.as_str())?,
            Slot::Index(i) => doc.get(&obj, i)?,
            Slot::Append => None,
        };
        obj = match next {
            Some((Value::Object(_), id)) => id,
            _ => return Err(bad(path, &format!("{t:?} does not exist"))),
        };
    }
    match slot(doc, &obj, last, path)? {
        Slot::Key(k) => doc.delete(&obj, k.as_str())?,
        Slot::Index(i) => doc.delete(&obj, i)?,
        Slot::Append => return Err(bad(path, "nothing at the end of a list")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_and_read_back() {
        let mut d = AutoCommit::new();
        // a missing container indexed by a number is created as a list
        put_json(&mut d, "/items/0", &json!("buy milk")).unwrap();
        put_json(&mut d, "/items/-", &json!({"a": [1, 2.5, true, null]})).unwrap();
        put_json(&mut d, "/deep/er/x~1y", &json!(-3)).unwrap();
        assert_eq!(
            to_json(&d),
            json!({"items": ["buy milk", {"a": [1, 2.5, true, null]}], "deep": {"er": {"x/y": -3}}})
        );
        put_json(&mut d, "/items/0", &json!("buy oat milk")).unwrap();
        delete_at(&mut d, "/deep").unwrap();
        assert_eq!(
            to_json(&d),
            json!({"items": ["buy oat milk", {"a": [1, 2.5, true, null]}]})
        );
        put_json(&mut d, "", &json!({"only": 1})).unwrap();
        assert_eq!(to_json(&d), json!({"only": 1}));
    }

    #[test]
    fn bad_paths_are_errors() {
        let mut d = AutoCommit::new();
        assert!(put_json(&mut d, "nope", &json!(1)).is_err());
        assert!(put_json(&mut d, "", &json!(1)).is_err());
        put_json(&mut d, "/l", &json!([1])).unwrap();
        assert!(put_json(&mut d, "/l/5", &json!(1)).is_err());
        assert!(put_json(&mut d, "/l/x", &json!(1)).is_err());
        assert!(put_json(&mut d, "/l/0/k", &json!(1)).is_err());
        assert!(delete_at(&mut d, "").is_err());
        let mut deep = json!(1);
        for _ in 0..(MAX_DEPTH + 1) {
            deep = json!([deep]);
        }
        assert!(put_json(&mut d, "/x", &deep).is_err());
    }
}
