//! `config.json` reading and writing: round trips over `arb_spec()`, transformers 4.x and 5.x
//! field placement, explicit fields winning, and validation errors naming the field.

use crate::common;

use proptest::prelude::*;
use serde_json::json;
use tunecheck::spec::{ArchSpec, Family, LayerType, Rope, RopeScaling};
use tunecheck::strategy::arb_spec;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn config_json_round_trips(spec in arb_spec()) {
        let v = tunecheck::io::config::to_json(&spec);
        let back = tunecheck::io::config::parse(&v).unwrap();
        prop_assert_eq!(back, spec);
    }
}

#[test]
fn reads_transformers_4x_gemma3_placement() {
    // 4.x: rope at top level, local base separate, layer pattern derived from the pattern length.
    let v = json!({
        "model_type": "gemma3_text", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "query_pre_attn_scalar": 12, "sliding_window": 4, "sliding_window_pattern": 6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "final_logit_softcapping": null, "attn_logit_softcapping": null, "torch_dtype": "bfloat16"
    });
    let s = tunecheck::io::config::parse(&v).unwrap();
    let fixture = tunecheck::io::config::read(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/models/gemma3/config.json"
    )))
    .unwrap();
    assert_eq!(s.layer_types, fixture.layer_types);
    assert_eq!(s.rope, fixture.rope);
    assert_eq!(s.rope_local, fixture.rope_local);
    assert_eq!(s.dtype, candle_core::DType::BF16);
    assert_eq!(s.layer_types[5], LayerType::Full);
    assert_eq!(s.layer_types.iter().filter(|t| **t == LayerType::Sliding).count(), 6);
}

#[test]
fn reads_transformers_4x_llama3_scaling_with_legacy_type_key() {
    let v = json!({
        "model_type": "llama", "vocab_size": 37, "hidden_size": 21, "intermediate_size": 27,
        "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 6,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
        "tie_word_embeddings": true
    });
    let s = tunecheck::io::config::parse(&v).unwrap();
    let fixture = tunecheck::io::config::read(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/models/llama_tied_odd/config.json"
    )))
    .unwrap();
    assert_eq!(s.rope, fixture.rope);
}

#[test]
fn gemma2_default_pattern_is_even_layers_sliding() {
    let v = json!({
        "model_type": "gemma2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "sliding_window": 2
    });
    let s = tunecheck::io::config::parse(&v).unwrap();
    use LayerType::*;
    assert_eq!(s.layer_types, vec![Sliding, Full, Sliding, Full]);
    assert_eq!(s.attn_logit_softcapping, Some(50.0));
    assert_eq!(s.final_logit_softcapping, Some(30.0));
    assert_eq!(s.query_pre_attn_scalar, Some(256.0));
}

#[test]
fn explicit_5x_fields_win_over_4x_ones() {
    let v = json!({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2,
        "rope_theta": 1234.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "layer_types": ["full_attention", "full_attention"]
    });
    let s = tunecheck::io::config::parse(&v).unwrap();
    assert_eq!(s.rope, Rope { theta: 500000.0, scaling: RopeScaling::None });
    assert_eq!(s.head_dim, 4);
    assert_eq!(s.num_kv_heads, 2);
    assert_eq!(s.family, Family::Llama);
}

#[test]
fn invalid_configs_name_the_field() {
    let base = json!({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2
    });
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("kv_heads_not_dividing", json!({"num_key_value_heads": 3})),
        ("heads_not_dividing_hidden", json!({"num_attention_heads": 3, "num_key_value_heads": 1})),
        ("zero_vocab", json!({"vocab_size": 0})),
        ("zero_layers", json!({"num_hidden_layers": 0})),
        ("odd_head_dim", json!({"head_dim": 3})),
        ("negative_size", json!({"hidden_size": -8})),
        ("string_size", json!({"hidden_size": "8"})),
        ("unknown_model_type", json!({"model_type": "mistral"})),
        ("missing_vocab", json!({"vocab_size": null})),
        ("layer_types_length", json!({"layer_types": ["full_attention"]})),
        ("layer_types_value", json!({"layer_types": ["full_attention", "local"]})),
        ("sliding_without_window", json!({"layer_types": ["sliding_attention", "full_attention"]})),
        ("bad_rope_type", json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}})),
        ("llama3_missing_factor", json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0}})),
        ("bad_dtype", json!({"dtype": "int8"})),
        ("attention_bias", json!({"attention_bias": true})),
        ("wrong_activation", json!({"hidden_act": "gelu"})),
        ("dropout_one", json!({"attention_dropout": 1.0})),
    ];
    let mut report = String::new();
    for (name, patch) in cases {
        let mut v = base.clone();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        let err = tunecheck::io::config::parse(&v).expect_err(name);
        report.push_str(&format!("{name}: {err}\n"));
    }
    common::golden().bind(|| insta::assert_snapshot!("config_errors", report));
}

#[test]
fn config_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, "{not json").unwrap();
    let e = tunecheck::io::config::read(&p).unwrap_err().to_string();
    assert!(e.starts_with(&p.display().to_string()) && e.contains("not valid JSON"), "{e}");
    std::fs::write(&p, r#"{"model_type": "llama"}"#).unwrap();
    let e = tunecheck::io::config::read(&p).unwrap_err().to_string();
    assert!(e.contains("config.json: field `hidden_size`: missing"), "{e}");
    let e = tunecheck::io::config::read(&dir.path().join("absent.json")).unwrap_err().to_string();
    assert!(e.contains("absent.json"), "{e}");
}

#[test]
fn spec_validation_rejects_inconsistent_specs() {
    let mut s = ArchSpec::tiny(Family::Gemma2);
    s.sliding_window = None;
    assert!(s.validate().unwrap_err().to_string().contains("sliding_window"));
    let mut s = ArchSpec::tiny(Family::Gemma);
    s.tie_word_embeddings = false;
    assert!(s.validate().unwrap_err().to_string().contains("tie_word_embeddings"));
    for f in Family::ALL {
        ArchSpec::tiny(f).validate().unwrap();
    }
}
