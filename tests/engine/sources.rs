//! Model sources: the manifest, a local Hugging Face directory, and a repo id resolved from a
//! hub cache laid out on disk (no hub is reachable from the tests).

use std::path::Path;

use knots::engine::{ModelPath, manifest, resolve};

use super::models_dir;

#[test]
fn manifest_lists_the_default_models() {
    let models = manifest(&models_dir()).unwrap();
    let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "all-minilm-l6-v2"]);
    assert!(matches!(
        resolve("smollm2-135m-instruct", &models_dir()).unwrap(),
        ModelPath::Gguf(_)
    ));
    assert!(matches!(
        resolve("all-minilm-l6-v2", &models_dir()).unwrap(),
        ModelPath::HfDir(_)
    ));
    assert!(resolve("no such model", &models_dir()).is_err());
}

/// Lays out `models--org--name/{refs/main, snapshots/<rev>/...}` as hf-hub writes it.
fn hub_layout(cache: &Path, repo: &str, files: &Path) -> std::path::PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), rev).unwrap();
    let snap = root.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::os::unix::fs::symlink(files.join(f), snap.join(f)).unwrap();
    }
    snap
}

#[test]
fn hub_repo_ids_resolve_from_the_local_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let minilm = models_dir().join("cache/all-minilm-l6-v2");
    let snap = hub_layout(
        tmp.path(),
        "sentence-transformers/all-MiniLM-L6-v2",
        &minilm,
    );
    // SAFETY: this test is the only one touching these variables.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", tmp.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let found = resolve("sentence-transformers/all-MiniLM-L6-v2", &models_dir());
    let missing = resolve("someone/not-cached", &models_dir());
    unsafe {
        std::env::remove_var("HF_HUB_CACHE");
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    assert_eq!(found.unwrap(), ModelPath::HfDir(snap));
    let err = missing.unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// The GGUF's weights written as a sharded Hugging Face directory (config from transformers,
/// tokenizer.json saved from the GGUF tokenizer) load into the same model: identical logits.
#[test]
fn sharded_hf_directory_loads_the_same_llama() {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};
    use knots::engine::{GgufFile, KvCache, TextModel, TextTokenizer, WeightFormat};

    let ModelPath::Gguf(gguf_path) = resolve("smollm2-135m-instruct", &models_dir()).unwrap()
    else {
        panic!("expected GGUF");
    };
    let gguf = GgufFile::open(&gguf_path).unwrap();
    let store = gguf
        .load_weights(
            &gguf.llama_config().unwrap(),
            &Device::Cpu,
            WeightFormat::F32,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in store.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.to_string(), file.clone().into());
        shards[i % 2].insert(name.to_string(), t.clone());
    }
    for (i, shard) in shards.iter().enumerate() {
        let file = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, file).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(
        super::reference("smollm2/hf_config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let tok = TextTokenizer::from_gguf(&gguf).unwrap();
    tok.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let template = serde_json::json!({"chat_template": super::smollm2().chat.source()});
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        template.to_string(),
    )
    .unwrap();
    drop(store);

    let from_dir = TextModel::load(
        &resolve(dir.path().to_str().unwrap(), &models_dir()).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(from_dir.tokenizer.eos_ids, vec![2]);
    let case = super::reference_json("smollm2/base_chat_1.json");
    let messages: Vec<knots::engine::Message> =
        serde_json::from_value(case["prompt"]["messages"].clone()).unwrap();
    let prompt = from_dir.encode_chat(&messages).unwrap();
    assert_eq!(prompt, super::smollm2().encode_chat(&messages).unwrap());
    let logits = |m: &TextModel| -> Vec<f32> {
        m.model
            .forward(&prompt, &mut KvCache::default(), None)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(logits(&from_dir), logits(super::smollm2()));
}
