//! A proptest strategy for arbitrary JSON, used by the protocol's frame properties
//! and by `shared`'s JWT properties (included there by path: one generator for both).

use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value up to three levels deep, with numbers that round-trip exactly.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Quarters print and parse back exactly, whatever float parser serde_json uses.
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
