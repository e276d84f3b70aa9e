//! The arguments of `veil bench`, shared by the benchmark modules it dispatches to.

use std::path::PathBuf;

use clap::builder::ArgPredicate;
use clap::Args;

use crate::args::ModelArgs;

/// Arguments of `veil bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// How many times to run (default 3; 5 with --llama-cpp); the report gives medians.
    #[arg(
        long,
        default_value_t = 3,
        default_value_if("llama_cpp", ArgPredicate::IsPresent, "5")
    )]
    pub runs: usize,

    /// Tokens to decode in each run (greedy, past any end token).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,

    /// The prompt, rendered with the chat template.
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,

    /// Also run this encrypted model (from `veil ee encrypt`) in the same run, alternating with
    /// the plaintext model, and report the speed ratio.
    #[arg(long, value_name = "PATH", requires = "key")]
    pub encrypted: Option<PathBuf>,

    /// The key the encrypted model was made with.
    #[arg(long, value_name = "PATH", requires = "encrypted")]
    pub key: Option<PathBuf>,

    /// Measure against llama.cpp's own `llama-bench` on the same GGUF files (--file, default:
    /// the model as stored and a Q8_0 copy), same prompt length, tokens and threads, each run a
    /// fresh process, Veil and llama.cpp alternating; prints speeds, peak memory and ratios.
    /// llama.cpp's tools come from $VEIL_LLAMA_CPP (a bin dir) or are built once by
    /// shared/tools/build_llamacpp.sh. Ignores --model, --dtype and --layers.
    #[arg(long, conflicts_with = "encrypted")]
    pub llama_cpp: bool,

    /// With --llama-cpp: a GGUF file to measure, a path or a known model's name; repeat for
    /// more.
    #[arg(long = "file", value_name = "NAME|PATH", requires = "llama_cpp")]
    pub files: Vec<String>,

    /// With --llama-cpp: also measure a copy of each file quantized to this type by
    /// `llama-quantize --allow-requantize` (e.g. Q4_K_M, Q8_0), written once under
    /// $VEIL_HOME/bench; repeat for more.
    #[arg(long, value_name = "TYPE", requires = "llama_cpp")]
    pub quantize: Vec<String>,

    /// With --llama-cpp: the Veil side of one run, in its own process (used by the benchmark).
    #[arg(long, hide = true, requires = "llama_cpp")]
    pub veil_worker: bool,

    /// Measure the gateway instead: tokens/s through its HTTP API against generating directly
    /// (alternating, same answer), then time to first token and aggregate tokens/s for 1, 4 and
    /// 16 concurrent streamed requests.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp"])]
    pub gateway: bool,

    /// Measure the gateway against llama.cpp's llama-server instead, side by side: the official
    /// openai client (AsyncOpenAI) sends 1, 4 and 16 concurrent streamed requests to each (same
    /// file, same threads; llama-server with -np 4 and -np 16).
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway"])]
    pub serving: bool,

    /// With --serving: each concurrent request asks about its own subject, instead of all
    /// asking for the same story (prompts then share only the chat template and first words).
    #[arg(long, requires = "serving")]
    pub distinct_prompts: bool,

    /// With --serving: serve through a swarm instead, a gateway (`--max-concurrent 16`) over a
    /// chain of three `veil node` processes on loopback, one thread each; prints aggregate
    /// tokens/s at 1, 4 and 16 concurrent requests and the ratio of 16 to 1.
    #[arg(long, requires = "serving")]
    pub swarm: bool,

    /// With --gateway or --serving: requests decoding together in the gateway's continuous
    /// batching engine (1: one generation at a time; auto: MetaInf chooses per request from
    /// the requests in flight). --serving measures one Veil gateway per value given
    /// (`--batch 16 --batch auto`); --gateway the first.
    #[arg(long, value_name = "N|auto", default_value = "1")]
    pub batch: Vec<veil_serve::backend::Batching>,

    /// Measure MetaInf instead: a mixed workload (short and long prompts, shared prefixes,
    /// single and batched requests) with `--accel auto` against the default fixed
    /// configuration, alternating, and print the throughput ratio.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway"])]
    pub meta: bool,

    /// Run the soak instead: a gateway and four nodes (real processes on loopback) serve
    /// streamed clients for --soak-minutes, then as long again while a rogue peer and client run
    /// every attack of docs/SECURITY.md; prints honest throughput with and without the rogue,
    /// requests lost, what the rogue got, peak memory and sessions left open.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway", "meta"])]
    pub soak: bool,

    /// With --soak: minutes of each half (without, then with the rogue).
    #[arg(long, default_value_t = 10.0, requires = "soak")]
    pub soak_minutes: f64,

    /// With --soak: honest clients streaming at once.
    #[arg(long, default_value_t = 64, requires = "soak")]
    pub soak_clients: usize,

    /// With --soak: milliseconds the rogue waits between rounds of attacks.
    #[arg(long, default_value_t = 250, requires = "soak")]
    pub soak_pause_ms: u64,

    /// Measure a three-hop chain across real NATs instead (network namespaces; root only): decode
    /// tokens/s direct, relayed and hole-punched, alternating; the relay's bytes per generated
    /// token; and a NATed node's time from start to its first served request.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway", "meta", "soak", "serving"])]
    pub nat: bool,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}
