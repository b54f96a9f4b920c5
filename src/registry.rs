//! The registry: the one place that lists the connectors a topology may name, by `[source]`
//! and `[[sinks]]` `type`, and the sink of a topology that names none. The core parses
//! topologies through it and knows connectors only as `SourceSpec`/`SinkSpec`; adding a
//! connector is a type in `sluice-connectors` and a line here.

use sluice_connectors::files::csv::CsvConfig;
use sluice_connectors::files::jsonl::JsonlConfig;
use sluice_connectors::files::live::FilesConfig;
use sluice_connectors::generator::GeneratorConfig;
use sluice_connectors::kafka::sink::KafkaSinkConfig;
use sluice_connectors::kafka::source::KafkaSourceConfig;
use sluice_connectors::postgres::sink::PostgresConfig;
use sluice_connectors::pubsub::sink::PubsubSinkConfig;
use sluice_connectors::pubsub::source::PubsubSourceConfig;
use sluice_core::connector::{Registry, SinkSpec};
use sluice_core::topology::{Topology, TopologyError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Every connector sluice has.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        Registry::new()
            .source::<CsvConfig>()
            .source::<FilesConfig>()
            .source::<KafkaSourceConfig>()
            .source::<GeneratorConfig>()
            .source::<PubsubSourceConfig>()
            .sink::<JsonlConfig>()
            .sink::<PostgresConfig>()
            .sink::<KafkaSinkConfig>()
            .sink::<PubsubSinkConfig>()
            .default_sink(|pipeline| jsonl(PathBuf::from("out").join(pipeline)))
    })
}

/// JSON lines in `dir`: the embedded default sink.
pub fn jsonl(dir: PathBuf) -> Arc<dyn SinkSpec> {
    Arc::new(JsonlConfig { dir })
}

/// Reads, parses and validates a topology file with every connector.
pub fn load(path: &Path) -> Result<Topology, TopologyError> {
    Topology::load(path, registry())
}

/// Parses and validates topology text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Topology, TopologyError> {
    Topology::parse(file, text, registry())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::topology::{Fallback, Padding, Provider, TaskConfig};

    #[test]
    fn kafka_source_and_sinks_parse_with_defaults() {
        let text = r#"name = "k"
[source]
type = "kafka"
brokers = "127.0.0.1:19092"
topic = "rides"
id = { from = "key" }
[task]
type = "tabular"
model = "Cargo.toml"
[[sinks]]
type = "kafka"
brokers = "127.0.0.1:19092"
topic = "out"
"#;
        let t = parse("k.toml", text).unwrap();
        let k = t.source.as_any().downcast_ref::<KafkaSourceConfig>().expect("a kafka source");
        assert_eq!(k.id, sluice_core::source::IdFrom::Key);
        assert_eq!((k.epoch_ms, k.start), (50, sluice_connectors::kafka::source::StartFrom::Earliest));
        assert!(t.sinks[0].as_any().downcast_ref::<KafkaSinkConfig>().expect("a kafka sink").idempotent);
        assert!(!t.default_sinks && !t.source.bounded());
        let tuned = text.replace("id = { from = \"key\" }", "id = { from = \"key\" }\nclient = { \"fetch.wait.max.ms\" = \"20\" }");
        let t = parse("k.toml", &tuned).unwrap();
        let client = &t.source.as_any().downcast_ref::<KafkaSourceConfig>().expect("a kafka source").client;
        assert_eq!(client.get("fetch.wait.max.ms").map(String::as_str), Some("20"), "librdkafka properties pass through");
        let bad = text.replace("id = { from = \"key\" }", "id = { from = \"nowhere\" }");
        assert!(parse("k.toml", &bad).is_err());
    }

    fn qa(extra: &str) -> String {
        format!(
            r#"name = "t"
[source]
type = "csv"
path = "samples/questions.csv"
[task]
type = "extractive_qa"
model = "Cargo.toml"
tokenizer = "Cargo.toml"
{extra}"#
        )
    }

    #[test]
    fn unknown_field_is_refused_with_file_and_field() {
        let e = parse("t.toml", &qa("max_batchh = 3")).unwrap_err();
        assert!(e.file.starts_with("t.toml:"), "{e}");
        assert_eq!(e.field, "max_batchh");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn zero_batch_is_refused_with_hint() {
        let e = parse("t.toml", &(qa("") + "[batching]\nmax_batch = 0\n")).unwrap_err();
        assert_eq!(e.field, "batching.max_batch");
        assert!(e.hint.contains("e.g. 8"));
    }

    #[test]
    fn missing_model_file_names_the_field() {
        let text = qa("").replace("model = \"Cargo.toml\"", "model = \"nope.onnx\"");
        let e = parse("t.toml", &text).unwrap_err();
        assert_eq!(e.field, "task.model");
    }

    #[test]
    fn defaults_fill_in() {
        let t = parse("t.toml", &qa("")).unwrap();
        assert_eq!(t.batching.max_batch, 8);
        let TaskConfig::ExtractiveQa { max_seq_len, doc_stride, max_answer_len, .. } = t.task else { panic!("a QA task") };
        assert_eq!((max_seq_len, doc_stride, max_answer_len), (384, 128, 30));
        assert!(t.default_sinks);
    }

    #[test]
    fn bad_metrics_address_is_refused() {
        let e = parse("t.toml", &(qa("") + "[metrics]\nlisten = \"nowhere\"\n")).unwrap_err();
        assert_eq!(e.field, "metrics.listen");
    }

    #[test]
    fn execution_defaults_follow_the_provider() {
        let cpu = parse("t.toml", &qa("")).unwrap();
        assert_eq!(cpu.execution.provider, Provider::Cpu);
        assert_eq!(cpu.execution.fallback, Fallback::None);
        assert_eq!((cpu.execution.runs(), cpu.batching.padding_on(Provider::Cpu), cpu.batching.pad_rows_on(Provider::Cpu)), (1, Padding::Longest, false));
        let gpu = parse("t.toml", &(qa("") + "[execution]\nprovider = \"cuda\"\ndevice_id = 1\ngpu_mem_limit_mb = 8192\n")).unwrap();
        assert_eq!((gpu.execution.provider, gpu.execution.device_id, gpu.execution.gpu_mem_limit_mb), (Provider::Cuda, 1, Some(8192)));
        assert_eq!((gpu.execution.runs(), gpu.batching.padding_on(Provider::Cuda), gpu.batching.pad_rows_on(Provider::Cuda)), (2, Padding::Bucket, true));
        assert_eq!(gpu.batching.pad_multiple, 64);
        let chosen = parse("t.toml", &(qa("") + "[batching]\npadding = \"longest\"\npad_rows = false\n[execution]\nprovider = \"cuda\"\n")).unwrap();
        assert_eq!((chosen.batching.padding_on(Provider::Cuda), chosen.batching.pad_rows_on(Provider::Cuda)), (Padding::Longest, false));
    }

    #[test]
    fn bad_execution_settings_name_the_field_and_the_fix() {
        let e = parse("t.toml", &(qa("") + "[execution]\nprovider = \"tpu\"\n")).unwrap_err();
        assert!(e.message.contains("unknown variant") && e.message.contains("cuda"), "{e}");
        let e = parse("t.toml", &(qa("") + "[execution]\ngpu_mem_limit_mb = 100\n")).unwrap_err();
        assert_eq!(e.field, "execution.provider");
        assert!(e.hint.contains("provider = \"cuda\""), "{e}");
        let e = parse("t.toml", &(qa("") + "[execution]\nruns_in_flight = 0\n")).unwrap_err();
        assert_eq!(e.field, "execution.runs_in_flight");
        let e = parse("t.toml", &(qa("") + "[batching]\npadding = \"bucket\"\npad_multiple = 512\n")).unwrap_err();
        assert_eq!(e.field, "batching.pad_multiple");
        let e = parse("t.toml", &(qa("") + "[batching]\nintra_threads = 2\n")).unwrap_err();
        assert_eq!(e.field, "intra_threads", "intra_threads moved to [execution]");
        assert!(e.hint.contains("[execution]"), "{e}");
    }

    #[test]
    fn unknown_connector_types_are_refused_with_the_types_listed() {
        let e = parse("t.toml", &qa("").replace("type = \"csv\"", "type = \"ftp\"")).unwrap_err();
        assert!(e.message.contains("unknown variant `ftp`") && e.message.contains("`csv`") && e.message.contains("`pubsub`"), "{e}");
        assert!(e.file.starts_with("t.toml:"), "{e}");
        let e = parse("t.toml", &(qa("") + "[[sinks]]\ntype = \"postgres\"\nurl = \"postgres://x@h/d\"\ntablee = \"a\"\n")).unwrap_err();
        assert_eq!(e.field, "sinks[0].tablee", "{e}");
        let t = parse("t.toml", &qa("")).unwrap();
        assert!(t.default_sinks && t.source.bounded());
        assert_eq!(t.sinks[0].kind(), "jsonl");
    }
}
