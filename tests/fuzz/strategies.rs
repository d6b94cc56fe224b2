//! Generators shared by the fuzz targets: the pieces of the `model` grammar, edge-case numbers
//! and JSON values, written as raw JSON text so that what `serde_json::Value` cannot hold
//! (duplicate keys, `NaN`, `1e400`, lone surrogates, deep nesting) is generated too.

use knots::merge::Method;
use proptest::prelude::*;
use proptest::strategy::Union;

use super::Bytes;

/// A boxed strategy (the generators are built from many alternatives).
pub type Gen<T> = BoxedStrategy<T>;

/// One of `items`.
pub fn pick<T: Clone + std::fmt::Debug + 'static>(items: &[T]) -> Gen<T> {
    prop::sample::select(items.to_vec()).boxed()
}

/// One of `items`, as owned strings.
pub fn pick_str(items: &[&str]) -> Gen<String> {
    let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    prop::sample::select(items).boxed()
}

/// Adapter, base, bundle and experiment names: served ones, valid random ones, and invalid ones
/// (`..`, empty, too long, unicode, control characters, three path parts).
pub fn name() -> Gen<String> {
    prop_oneof![
        6 => pick_str(&[
            "math", "code", "poetry", "sentiment", "topic", "secret", "acme/secret",
            "globex/secret", "gen", "enc", "stem", "ab", "org/gen-base", "missing", "x",
        ]),
        4 => "[A-Za-z0-9][A-Za-z0-9._-]{0,12}",
        2 => "[a-z0-9]{1,6}/[a-z0-9][a-z0-9._-]{0,6}",
        1 => pick_str(&[
            "", ".", "..", "a..b", "../x", "a/../b", "/a", "a/", "a/b/c", "%2e%2e", "a b", "a\0b",
            "a\u{301}", "ß", "名前", "a\u{200b}", "-a", "_a", "a:b", "a@b", "a+b", "bundle",
            "exp", "bundle:x", "A", "0", "a.", "a-",
        ]),
        1 => (120usize..135).prop_map(|n| "a".repeat(n)),
        1 => (120usize..135, 120usize..135)
            .prop_map(|(t, n)| format!("{}/{}", "t".repeat(t), "n".repeat(n))),
        1 => "\\PC{0,10}",
        1 => any::<String>(),
    ]
    .boxed()
}

/// `model` strings naming what the fuzzed router serves (bases, adapters, sets, bundles and
/// the experiment), with and without weights and methods.
pub fn served_model() -> Gen<String> {
    pick_str(&[
        "gen",
        "enc",
        "math",
        "code",
        "math+code",
        "math:0.5+code@ties",
        "sentiment",
        "topic",
        "sentiment+topic",
        "sentiment:2+topic@knots-dare-ties",
        "bundle:stem",
        "bundle:acme-only",
        "exp:ab",
        "secret",
        "acme/secret",
        "secret+math",
        "math+code@knots-ties",
        "math+code@core-iso-cts",
        "math+code@core-tsv",
        "math+code@dare-ties",
        "math:-1+code@ta",
        "math:0+code@knots-ta",
        "math:1e300+code",
        "math:1e-300+code@core-ties",
        "math+math",
        "math+sentiment",
        "extra",
        "math@ties",
        "code:3",
    ])
}

/// The text of a set member's weight: numbers as Rust and users write them, and non-numbers.
pub fn weight_text() -> Gen<String> {
    prop_oneof![
        4 => (-4.0f64..4.0).prop_map(|w| format!("{w}")),
        2 => pick_str(&[
            "0", "-0", "1", "0.5", "-1", "2", ".5", "5.", "+1", "1e3", "1E-3", "1e308", "-1e308",
            "1e309", "-1e309", "1e-400", "NaN", "nan", "inf", "-inf", "+inf", "infinity",
            "Infinity", "", " 1", "1 ", "1_0", "0x10", "1e", "e1", "--1", "١", "0.1.2", "1/2",
        ]),
        1 => any::<f64>().prop_map(|w| format!("{w}")),
        1 => any::<f64>().prop_map(|w| format!("{w:e}")),
        1 => "[0-9eE.+-]{0,8}",
    ]
    .boxed()
}

/// Method names, real and not.
pub fn method_text() -> Gen<String> {
    let real: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
    prop_oneof![
        6 => pick_str(&real),
        1 => pick_str(&[
            "", "knots", "TIES", "ties ", " ta", "ta\0", "knots_ties", "core", "iso-c",
        ]),
        1 => "[a-z-]{0,16}",
        1 => "\\PC{0,6}",
    ]
    .boxed()
}

/// A `model` string from the grammar's pieces, sometimes broken: members with and without
/// weights joined by `+`, an optional `@method`, `bundle:` and `exp:` prefixes, stray
/// separators; plus long strings around the length limit and arbitrary text.
pub fn model_string() -> Gen<String> {
    let member = (name(), prop::option::weighted(0.4, weight_text())).prop_map(|(n, w)| match w {
        Some(w) => format!("{n}:{w}"),
        None => n,
    });
    let set = (
        prop::collection::vec(member, 1..6),
        prop::option::weighted(0.4, method_text()),
        pick_str(&["", "", "", "", "", "", "bundle:", "exp:"]),
        prop::option::weighted(
            0.15,
            (
                any::<prop::sample::Index>(),
                pick_str(&["+", ":", "@", "@@", "++", "::", "/", " ", "\u{0}", "é"]),
            ),
        ),
    )
        .prop_map(|(members, method, prefix, stray)| {
            let mut s = format!("{prefix}{}", members.join("+"));
            if let Some(m) = method {
                s.push('@');
                s.push_str(&m);
            }
            if let Some((at, piece)) = stray {
                let boundaries: Vec<usize> =
                    (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
                s.insert_str(boundaries[at.index(boundaries.len())], &piece);
            }
            s
        });
    let long = prop_oneof![
        // Around the 16 KiB limit.
        (8180usize..8200).prop_map(|n| vec!["a"; n].join("+")),
        // 64 maximal members with weights, which the limit is meant to admit.
        (60usize..70).prop_map(|n| vec![format!("{}:0.5", "a".repeat(128)); n].join("+")),
        (16000usize..16500).prop_map(|n| "a".repeat(n)),
        (1usize..40).prop_map(|n| format!("{}@ties", vec!["math"; n].join("+"))),
    ];
    prop_oneof![
        12 => set,
        1 => long,
        1 => any::<String>(),
        1 => prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    .boxed()
}

/// Floats at the edges of every range the server checks, and anywhere.
pub fn special_f64() -> Gen<f64> {
    prop_oneof![
        3 => pick(&[
            0.0, -0.0, 1.0, -1.0, 0.5, 0.2, 0.8, 2.0, -2.0, 100.0, -100.0, 1e-300,
            f64::MIN_POSITIVE,
            5e-324, f64::MAX, f64::MIN, f64::EPSILON, 1.0 + f64::EPSILON, 1.0 - f64::EPSILON / 2.0,
            2.0000000000000004, 100.00000000000001, f64::NAN, f64::INFINITY, f64::NEG_INFINITY,
        ]),
        2 => -3.0f64..3.0,
        1 => any::<f64>(),
    ]
    .boxed()
}

/// Integers at the edges of the server's ranges.
pub fn special_i64() -> Gen<i64> {
    prop_oneof![
        3 => pick(&[
            0i64, 1, -1, 2, 5, 6, 16, 17, 20, 21, 100, 101, 300, 301, i64::MIN, i64::MAX,
            i64::from(u32::MAX), i64::from(u32::MAX) + 1,
        ]),
        2 => -30i64..300,
        1 => any::<i64>(),
    ]
    .boxed()
}

/// A JSON string literal of `s` (with `\u` escapes where JSON needs them).
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// A JSON number as text; non-finite floats become what careless writers emit.
pub fn json_f64(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "1e400" } else { "-1e400" }.to_string()
    } else {
        serde_json::to_string(&x).expect("finite floats serialize")
    }
}

/// A JSON number at the edges of the server's ranges (finite: JSON has no others), or rarely
/// a token that is not a JSON number.
pub fn json_float() -> Gen<String> {
    prop_oneof![
        40 => special_f64().prop_map(|x| match x {
            x if x.is_nan() => "0".to_string(),
            x if x.is_infinite() => json_f64(x.signum() * f64::MAX),
            x => json_f64(x),
        }),
        1 => pick_str(&["NaN", "Infinity", "1e400", "-1e400", "1e-400", "-0", "1.", ".5", "+1"]),
    ]
    .boxed()
}

/// Number and literal tokens JSON parsers disagree on or must refuse.
fn odd_token() -> Gen<String> {
    pick_str(&[
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
        "18446744073709551616",
        "18446744073709551615",
        "-9223372036854775809",
        "-9223372036854775808",
        "-0",
        "0.0",
        "00",
        "1.",
        ".5",
        "+1",
        "0x10",
        "1e",
        "true",
        "false",
        "null",
        "nul",
        "\"\\ud800\"",
        "\"\\u0000\"",
        "\"\\udc00\\ud800\"",
        "\"\\x41\"",
        "'a'",
        "\"a\nb\"",
        "[",
        "{",
        "]",
        "",
        "[]",
        "{}",
        "\"\"",
    ])
}

/// Any JSON value as text: scalars at the edges, strings, arrays and objects (nested a few
/// levels), odd tokens, and nesting deeper than parsers allow.
pub fn json_value() -> Gen<String> {
    let leaf = prop_oneof![
        6 => json_float(),
        6 => special_i64().prop_map(|x| x.to_string()),
        3 => any::<u64>().prop_map(|x| x.to_string()),
        3 => any::<bool>().prop_map(|b| b.to_string()),
        3 => Just("null".to_string()),
        9 => "\\PC{0,12}".prop_map(|s| json_str(&s)),
        3 => any::<String>().prop_map(|s| json_str(&s)),
        1 => odd_token(),
        1 => (100usize..300).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("\\PC{0,6}", inner), 0..5)
                .prop_map(|kv| object(kv.iter().map(|(k, v)| (k.as_str(), v.as_str())))),
        ]
    })
    .boxed()
}

/// A JSON object as text from `(key, raw value)` pairs, duplicates kept.
pub fn object<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let body: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{}:{v}", json_str(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// A field of a JSON object: its name and a raw value from `value`, or rarely any value.
pub fn field(name: &'static str, value: Gen<String>) -> Gen<(String, String)> {
    prop_oneof![
        24 => value,
        1 => json_value(),
    ]
    .prop_map(move |v| (name.to_string(), v))
    .boxed()
}

/// An object of some of `fields` (in any order, sometimes repeated) and sometimes unknown keys.
pub fn object_of(fields: Vec<Gen<(String, String)>>, max: usize) -> Gen<String> {
    let unknown = ("[a-z_]{1,12}", json_value()).boxed();
    let entry = prop_oneof![
        12 => Union::new(fields),
        1 => unknown,
    ];
    (
        prop::collection::vec(entry, 0..max),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(kv, unique)| object(distinct(&kv, unique)))
        .boxed()
}

/// The pairs as `(&str, &str)`, only the first of each key when `unique` (JSON objects with
/// duplicate keys are refused by typed parsers, so they come now and then only).
fn distinct(kv: &[(String, String)], unique: bool) -> Vec<(&str, &str)> {
    let mut seen = std::collections::HashSet::new();
    kv.iter()
        .filter(|(k, _)| !unique || seen.insert(k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// An object of `required` fields (each present most of the time) followed by some of
/// `optional` ones and sometimes unknown keys.
pub fn object_with(
    required: Vec<Gen<(String, String)>>,
    optional: Vec<Gen<(String, String)>>,
    max: usize,
) -> Gen<String> {
    let required: Vec<_> = required
        .into_iter()
        .map(|g| prop::option::weighted(0.9, g))
        .collect();
    let unknown = ("[a-z_]{1,12}", json_value()).boxed();
    let entry = prop_oneof![
        12 => Union::new(optional),
        1 => unknown,
    ];
    (
        required,
        prop::collection::vec(entry, 0..max),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(head, rest, unique)| {
            let all: Vec<(String, String)> = head.into_iter().flatten().chain(rest).collect();
            object(distinct(&all, unique))
        })
        .boxed()
}

/// An edit that damages a text or file: truncation, inserted bytes or a JSON token, a deleted
/// range.
pub fn edit() -> Gen<Edit> {
    let at = || any::<prop::sample::Index>();
    prop_oneof![
        at().prop_map(Edit::Truncate),
        (at(), prop::collection::vec(any::<u8>(), 1..4)).prop_map(|(i, b)| Edit::Insert(i, b)),
        (at(), odd_token()).prop_map(|(i, t)| Edit::Insert(i, t.into_bytes())),
        (at(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
    ]
    .boxed()
}

/// `text`, damaged by an edit now and then; or random bytes, or any JSON value.
pub fn mutate(text: Gen<String>) -> Gen<Bytes> {
    let edit = prop_oneof![28 => Just(Edit::None), 4 => edit()];
    prop_oneof![
        20 => (text, edit).prop_map(|(t, e)| Bytes(e.apply(t.into_bytes()))),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes),
        1 => json_value().prop_map(|v| Bytes(v.into_bytes())),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
pub enum Edit {
    None,
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Delete(prop::sample::Index, usize),
}

impl Edit {
    pub fn apply(self, mut bytes: Vec<u8>) -> Vec<u8> {
        match self {
            Edit::None => {}
            Edit::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Edit::Insert(i, b) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, b);
            }
            Edit::Delete(i, n) => {
                let at = i.index(bytes.len() + 1);
                bytes.drain(at..(at + n).min(bytes.len()));
            }
        }
        bytes
    }
}

/// The `merge` field of a request, as an object with its real keys and edge values.
pub fn merge_field_json() -> Gen<String> {
    object_of(
        vec![
            field("method", method_text().prop_map(|m| json_str(&m)).boxed()),
            field("density", json_float()),
            field("lambda", json_float()),
            field("dare_p", json_float()),
            field("common_fraction", json_float()),
            field("seed", any::<u64>().prop_map(|s| s.to_string()).boxed()),
            field(
                "isotropize",
                any::<bool>().prop_map(|b| b.to_string()).boxed(),
            ),
        ],
        5,
    )
}
