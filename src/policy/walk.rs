//! Reading a parsed TOML document key by key while collecting every problem, each with
//! its line, key path, what was expected and what was found. The validator in
//! [`super::parse`] asks a [`Section`] for typed values; whatever it never asks for is an
//! unknown key.

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

/// One thing wrong in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line (0 when the file could not be read at all).
    pub line: usize,
    /// Dotted key path (`schedule.cron`), or `(file)` for the file as a whole.
    pub key: String,
    /// What the key must hold.
    pub expected: String,
    /// What the file holds instead.
    pub found: String,
}

/// Problems found so far in one file, and the text to turn spans into lines.
pub struct Problems<'s> {
    source: &'s str,
    /// The problems, in the order found.
    pub list: Vec<Problem>,
}

impl<'s> Problems<'s> {
    /// Starts collecting problems for `source`.
    pub fn new(source: &'s str) -> Self {
        Problems {
            source,
            list: vec![],
        }
    }

    /// The 1-based line of a byte offset.
    pub fn line_of(&self, span: Option<Range<usize>>) -> usize {
        match span {
            Some(r) => {
                let end = r.start.min(self.source.len());
                self.source.as_bytes()[..end]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1
            }
            None => 1,
        }
    }

    /// Records a problem.
    pub fn add(
        &mut self,
        span: Option<Range<usize>>,
        key: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) {
        let line = self.line_of(span);
        self.list.push(Problem {
            line,
            key: key.to_string(),
            expected: expected.into(),
            found: found.into(),
        });
    }
}

/// How a value is described in "found ...".
pub fn describe(item: &Item) -> String {
    match item {
        Item::None => "nothing".into(),
        Item::Table(_) => "a table".into(),
        Item::ArrayOfTables(_) => "an array of tables".into(),
        Item::Value(v) => describe_value(v),
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {:?}", s.value()),
        Value::Integer(i) => format!("the integer {}", i.value()),
        Value::Float(f) => format!("the number {}", f.value()),
        Value::Boolean(b) => format!("the boolean {}", b.value()),
        Value::Datetime(d) => format!("the date-time {}", d.value()),
        Value::Array(_) => "an array".into(),
        Value::InlineTable(_) => "a table".into(),
    }
}

/// A table being read: its key path, its span, and which keys were asked for.
pub struct Section<'d> {
    path: String,
    table: &'d dyn TableLike,
    span: Option<Range<usize>>,
    asked: Vec<String>,
}

fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        Item::None => None,
    }
}

impl<'d> Section<'d> {
    /// The document's top-level table.
    pub fn root(table: &'d dyn TableLike) -> Self {
        Section {
            path: String::new(),
            table,
            span: Some(0..0),
            asked: vec![],
        }
    }

    /// The dotted path of `key` in this section.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// This section's own path (`(top level)` for the root).
    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        }
    }

    /// Where this section starts.
    pub fn span(&self) -> Option<Range<usize>> {
        self.span.clone()
    }

    /// Whether `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.table.get(key).is_some()
    }

    /// The raw item under `key` (marks it as known) and the best span for it.
    pub fn raw(&mut self, key: &str) -> Option<(&'d Item, Option<Range<usize>>)> {
        self.asked.push(key.to_string());
        let (k, item) = self.table.get_key_value(key)?;
        let span = item_span(item).or_else(|| k.span());
        Some((item, span))
    }

    /// A string value.
    pub fn string(
        &mut self,
        p: &mut Problems,
        key: &str,
        expected: &str,
    ) -> Option<Spanned<String>> {
        let (item, span) = self.raw(key)?;
        match item.as_str() {
            Some(s) => Some(Spanned {
                value: s.to_string(),
                span,
            }),
            None => {
                p.add(span, &self.path_of(key), expected, describe(item));
                None
            }
        }
    }

    /// A required string value.
    pub fn required_string(
        &mut self,
        p: &mut Problems,
        key: &str,
        expected: &str,
    ) -> Option<Spanned<String>> {
        if !self.has(key) {
            self.asked.push(key.to_string());
            p.add(
                self.span(),
                &self.path_of(key),
                expected,
                "nothing (the key is required)",
            );
            return None;
        }
        self.string(p, key, expected)
    }

    /// An integer in `range`.
    pub fn integer(
        &mut self,
        p: &mut Problems,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let (item, span) = self.raw(key)?;
        let expected = if *range.end() == i64::MAX {
            format!("an integer of at least {}", range.start())
        } else {
            format!("an integer from {} to {}", range.start(), range.end())
        };
        match item.as_integer() {
            Some(i) if range.contains(&i) => Some(i),
            _ => {
                p.add(span, &self.path_of(key), expected, describe(item));
                None
            }
        }
    }

    /// A boolean.
    pub fn boolean(&mut self, p: &mut Problems, key: &str) -> Option<bool> {
        let (item, span) = self.raw(key)?;
        match item.as_bool() {
            Some(b) => Some(b),
            None => {
                p.add(span, &self.path_of(key), "true or false", describe(item));
                None
            }
        }
    }

    /// An array of strings.
    pub fn strings(
        &mut self,
        p: &mut Problems,
        key: &str,
        expected: &str,
    ) -> Option<Vec<Spanned<String>>> {
        let (item, span) = self.raw(key)?;
        let Some(arr) = item.as_array() else {
            p.add(span, &self.path_of(key), expected, describe(item));
            return None;
        };
        let mut out = vec![];
        let mut ok = true;
        for (i, v) in arr.iter().enumerate() {
            match v.as_str() {
                Some(s) => out.push(Spanned {
                    value: s.to_string(),
                    span: v.span(),
                }),
                None => {
                    ok = false;
                    p.add(
                        v.span().or(span.clone()),
                        &format!("{}[{i}]", self.path_of(key)),
                        "a string",
                        describe_value(v),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    /// A sub-table (`[a.b]` or an inline table).
    pub fn table(&mut self, p: &mut Problems, key: &str) -> Option<Section<'d>> {
        let (item, span) = self.raw(key)?;
        match item.as_table_like() {
            Some(t) => Some(Section {
                path: self.path_of(key),
                table: t,
                span,
                asked: vec![],
            }),
            None => {
                p.add(span, &self.path_of(key), "a table", describe(item));
                None
            }
        }
    }

    /// An array of tables (`[[a.b]]` or an array of inline tables).
    pub fn tables(&mut self, p: &mut Problems, key: &str) -> Option<Vec<Section<'d>>> {
        let (item, span) = self.raw(key)?;
        let path = self.path_of(key);
        match item {
            Item::ArrayOfTables(a) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, t)| Section {
                        path: format!("{path}[{i}]"),
                        table: t,
                        span: t.span().or(span.clone()),
                        asked: vec![],
                    })
                    .collect(),
            ),
            Item::Value(Value::Array(arr)) => {
                let mut out = vec![];
                for (i, v) in arr.iter().enumerate() {
                    match v.as_inline_table() {
                        Some(t) => out.push(Section {
                            path: format!("{path}[{i}]"),
                            table: t,
                            span: v.span().or(span.clone()),
                            asked: vec![],
                        }),
                        None => p.add(
                            v.span().or(span.clone()),
                            &format!("{path}[{i}]"),
                            "a table",
                            describe_value(v),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                p.add(span, &path, "an array of tables", describe(other));
                None
            }
        }
    }

    /// Reports every key present that was never asked for, naming the keys allowed here
    /// (the ones the validator asked for).
    pub fn finish(&self, p: &mut Problems) {
        let mut allowed: Vec<&str> = vec![];
        for a in &self.asked {
            if !allowed.contains(&a.as_str()) {
                allowed.push(a);
            }
        }
        let allowed_hint = allowed.join(", ");
        for (k, item) in self.table.iter() {
            if self.asked.iter().any(|a| a == k) {
                continue;
            }
            let span = self
                .table
                .get_key_value(k)
                .and_then(|(key, _)| key.span())
                .or_else(|| item_span(item));
            p.add(
                span,
                &self.path_of(k),
                if allowed.is_empty() {
                    "no keys here".to_string()
                } else {
                    format!("one of {allowed_hint}")
                },
                match allowed.iter().find(|a| edit_distance(a, k) <= 2) {
                    Some(near) => format!("the unknown key `{k}` (did you mean `{near}`?)"),
                    None => format!("the unknown key `{k}`"),
                },
            );
        }
    }
}

/// Levenshtein distance, for "did you mean" on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A value and where it was in the file.
#[derive(Clone, Debug)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Its byte range.
    pub span: Option<Range<usize>>,
}
