// llama.cpp reference dumper for Veil's conformance suite. Built against libllama by make_reference.sh.
//
//   reference logits   MODEL OUT.json NAME VERSION [--kv f32|f16] [--fa off|on|auto] [--greedy N]
//       evaluates a fixed sequence of 20 token ids in one batch (logits for every position), writes the
//       first 64 logits of every position, the argmax and top-1/top-2 margin of every position, then
//       greedy-decodes N (default 8) tokens one at a time through the KV cache.
//   reference tokenize MODEL STRINGS.json OUT.json NAME VERSION
//       STRINGS.json is a JSON array of strings (only \" \\ \n \t \uXXXX escapes needed); writes the ids
//       llama.cpp gives with add_special=false, parse_special=true (and with add_special=true).
//   reference generate MODEL OUT.json NAME VERSION N PROMPT...
//       tokenizes each raw PROMPT with add_special=true (BOS if the file asks), parse_special=true,
//       greedy-decodes N tokens, writes ids and text.
// Always one thread (n_threads = n_threads_batch = 1).
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static const int N_LOGITS = 64;

static std::string json_str(const std::string & s) {
    // escapes for JSON; invalid UTF-8 bytes become U+FFFD
    std::string o = "\"";
    size_t i = 0;
    while (i < s.size()) {
        unsigned char c = s[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        bool ok = len > 0 && i + len <= s.size();
        for (int k = 1; ok && k < len; k++) ok = ((unsigned char) s[i + k] >> 6) == 2;
        if (!ok) { o += "\\ufffd"; i++; continue; }
        if (len == 1) {
            if (c == '"') o += "\\\"";
            else if (c == '\\') o += "\\\\";
            else if (c == '\n') o += "\\n";
            else if (c == '\t') o += "\\t";
            else if (c == '\r') o += "\\r";
            else if (c < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", c); o += b; }
            else o += (char) c;
        } else {
            o += s.substr(i, len);
        }
        i += len;
    }
    return o + "\"";
}

static std::string fmt_f(float f) { char b[32]; snprintf(b, sizeof b, "%.9g", f); return b; }

template <class T> static std::string json_arr(const std::vector<T> & v) {
    std::string o = "[";
    for (size_t i = 0; i < v.size(); i++) { if (i) o += ","; o += std::to_string(v[i]); }
    return o + "]";
}
static std::string json_farr(const float * v, int n) {
    std::string o = "[";
    for (int i = 0; i < n; i++) { if (i) o += ","; o += fmt_f(v[i]); }
    return o + "]";
}

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN && getenv("REF_VERBOSE") == nullptr) fputs(text, stderr);
    else if (getenv("REF_VERBOSE")) fputs(text, stderr);
}

static llama_model * load(const char * path, bool vocab_only) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = vocab_only;
    mp.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * m = llama_model_load_from_file(path, mp);
    if (!m) { fprintf(stderr, "failed to load %s\n", path); exit(1); }
    return m;
}

static llama_context * make_ctx(llama_model * m, ggml_type kv, llama_flash_attn_type fa) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_seq_max = 1;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.type_k = kv;
    cp.type_v = kv;
    cp.flash_attn_type = fa;
    cp.swa_full = true;
    cp.no_perf = true;
    llama_context * c = llama_init_from_model(m, cp);
    if (!c) { fprintf(stderr, "failed to create context\n"); exit(1); }
    return c;
}

static int argmax(const float * l, int n, float * margin) {
    int best = 0;
    for (int i = 1; i < n; i++) if (l[i] > l[best]) best = i;
    float second = -INFINITY;
    for (int i = 0; i < n; i++) if (i != best && l[i] > second) second = l[i];
    if (margin) *margin = l[best] - second;
    return best;
}

static void decode_or_die(llama_context * c, llama_batch & b) {
    int rc = llama_decode(c, b);
    if (rc != 0) { fprintf(stderr, "llama_decode failed: %d\n", rc); exit(1); }
}

static std::string piece(const llama_vocab * v, llama_token t) {
    char buf[256];
    int n = llama_token_to_piece(v, t, buf, sizeof buf, 0, true);
    return n < 0 ? std::string() : std::string(buf, n);
}

static FILE * open_out(const char * p) {
    FILE * f = fopen(p, "w");
    if (!f) { perror(p); exit(1); }
    return f;
}

static int cmd_logits(int argc, char ** argv) {
    if (argc < 6) { fprintf(stderr, "usage: logits MODEL OUT NAME VERSION [--kv f32|f16] [--fa off|on|auto] [--greedy N]\n"); return 2; }
    const char * model_path = argv[2]; const char * out = argv[3]; const char * name = argv[4]; const char * version = argv[5];
    ggml_type kv = GGML_TYPE_F32; llama_flash_attn_type fa = LLAMA_FLASH_ATTN_TYPE_DISABLED; int n_greedy = 8;
    std::string kv_s = "f32", fa_s = "off";
    for (int i = 6; i + 1 < argc; i += 2) {
        std::string k = argv[i], v = argv[i + 1];
        if (k == "--kv") { kv_s = v; kv = v == "f16" ? GGML_TYPE_F16 : GGML_TYPE_F32; }
        else if (k == "--fa") { fa_s = v; fa = v == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED : v == "auto" ? LLAMA_FLASH_ATTN_TYPE_AUTO : LLAMA_FLASH_ATTN_TYPE_DISABLED; }
        else if (k == "--greedy") n_greedy = atoi(v.c_str());
    }
    llama_model * m = load(model_path, false);
    const llama_vocab * voc = llama_model_get_vocab(m);
    const int n_vocab = llama_vocab_n_tokens(voc);
    llama_context * c = make_ctx(m, kv, fa);

    // fixed ids: avoid the special tokens at both ends of the tiny vocabularies (ids 8..299)
    std::vector<llama_token> toks;
    for (int i = 0; i < 20; i++) toks.push_back(8 + (37 * i * i + 11 * i + 3) % 292);

    llama_batch b = llama_batch_init(512, 0, 1);
    b.n_tokens = (int) toks.size();
    for (int i = 0; i < b.n_tokens; i++) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    decode_or_die(c, b);
    std::vector<int> am; std::vector<std::string> rows, margins;
    for (int i = 0; i < (int) toks.size(); i++) {
        const float * l = llama_get_logits_ith(c, i);
        float mg; am.push_back(argmax(l, n_vocab, &mg));
        rows.push_back(json_farr(l, N_LOGITS)); margins.push_back(fmt_f(mg));
    }
    std::vector<int> greedy; std::vector<std::string> grows, gmargins;
    llama_token next = am.back();
    int pos = (int) toks.size();
    for (int s = 0; s < n_greedy; s++) {
        greedy.push_back(next);
        b.n_tokens = 1; b.token[0] = next; b.pos[0] = pos++; b.n_seq_id[0] = 1; b.seq_id[0][0] = 0; b.logits[0] = 1;
        decode_or_die(c, b);
        const float * l = llama_get_logits_ith(c, 0);
        float mg; next = argmax(l, n_vocab, &mg);
        grows.push_back(json_farr(l, N_LOGITS)); gmargins.push_back(fmt_f(mg));
    }
    llama_batch_free(b);

    char desc[256]; llama_model_desc(m, desc, sizeof desc);
    FILE * f = open_out(out);
    fprintf(f, "{\n\"model\": %s,\n\"llama_cpp\": %s,\n\"desc\": %s,\n", json_str(name).c_str(), json_str(version).c_str(), json_str(desc).c_str());
    fprintf(f, "\"config\": {\"n_threads\": 1, \"n_ctx\": 512, \"type_k\": \"%s\", \"type_v\": \"%s\", \"flash_attn\": \"%s\", \"batch\": \"all prompt tokens in one llama_decode, logits for every position; greedy steps one token per llama_decode\"},\n", kv_s.c_str(), kv_s.c_str(), fa_s.c_str());
    fprintf(f, "\"n_vocab\": %d,\n\"n_logits_recorded\": %d,\n\"tokens\": %s,\n", n_vocab, N_LOGITS, json_arr(toks).c_str());
    fprintf(f, "\"logits\": [\n");
    for (size_t i = 0; i < rows.size(); i++) fprintf(f, "  %s%s\n", rows[i].c_str(), i + 1 < rows.size() ? "," : "");
    fprintf(f, "],\n\"argmax\": %s,\n\"argmax_margin\": [", json_arr(am).c_str());
    for (size_t i = 0; i < margins.size(); i++) fprintf(f, "%s%s", i ? "," : "", margins[i].c_str());
    fprintf(f, "],\n\"greedy\": %s,\n\"greedy_logits\": [\n", json_arr(greedy).c_str());
    for (size_t i = 0; i < grows.size(); i++) fprintf(f, "  %s%s\n", grows[i].c_str(), i + 1 < grows.size() ? "," : "");
    fprintf(f, "],\n\"greedy_margin\": [");
    for (size_t i = 0; i < gmargins.size(); i++) fprintf(f, "%s%s", i ? "," : "", gmargins[i].c_str());
    fprintf(f, "]\n}\n");
    fclose(f);
    llama_free(c); llama_model_free(m);
    return 0;
}

// minimal JSON string-array reader
static std::vector<std::string> read_strings(const char * path) {
    FILE * f = fopen(path, "rb"); if (!f) { perror(path); exit(1); }
    std::string s; char buf[4096]; size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    fclose(f);
    std::vector<std::string> out; size_t i = 0;
    auto put_cp = [](std::string & o, unsigned cp) {
        if (cp < 0x80) o += (char) cp;
        else if (cp < 0x800) { o += (char) (0xC0 | (cp >> 6)); o += (char) (0x80 | (cp & 63)); }
        else if (cp < 0x10000) { o += (char) (0xE0 | (cp >> 12)); o += (char) (0x80 | ((cp >> 6) & 63)); o += (char) (0x80 | (cp & 63)); }
        else { o += (char) (0xF0 | (cp >> 18)); o += (char) (0x80 | ((cp >> 12) & 63)); o += (char) (0x80 | ((cp >> 6) & 63)); o += (char) (0x80 | (cp & 63)); }
    };
    while (i < s.size()) {
        if (s[i] != '"') { i++; continue; }
        i++; std::string cur;
        while (i < s.size() && s[i] != '"') {
            if (s[i] == '\\') {
                char e = s[i + 1]; i += 2;
                if (e == 'n') cur += '\n'; else if (e == 't') cur += '\t'; else if (e == 'r') cur += '\r';
                else if (e == 'u') {
                    unsigned cp = strtoul(s.substr(i, 4).c_str(), nullptr, 16); i += 4;
                    if (cp >= 0xD800 && cp < 0xDC00 && s[i] == '\\' && s[i + 1] == 'u') {
                        unsigned lo = strtoul(s.substr(i + 2, 4).c_str(), nullptr, 16); i += 6;
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    put_cp(cur, cp);
                } else cur += e;
            } else cur += s[i++];
        }
        i++; out.push_back(cur);
    }
    return out;
}

static std::vector<llama_token> tokenize(const llama_vocab * v, const std::string & s, bool add_special, bool parse_special) {
    std::vector<llama_token> t(s.size() + 16);
    int n = llama_tokenize(v, s.data(), (int) s.size(), t.data(), (int) t.size(), add_special, parse_special);
    if (n < 0) { t.resize(-n); n = llama_tokenize(v, s.data(), (int) s.size(), t.data(), (int) t.size(), add_special, parse_special); }
    t.resize(n);
    return t;
}

static int cmd_tokenize(int argc, char ** argv) {
    if (argc < 7) { fprintf(stderr, "usage: tokenize MODEL STRINGS.json OUT NAME VERSION\n"); return 2; }
    llama_model * m = load(argv[2], true);
    const llama_vocab * v = llama_model_get_vocab(m);
    auto strs = read_strings(argv[3]);
    FILE * f = open_out(argv[4]);
    fprintf(f, "{\n\"model\": %s,\n\"llama_cpp\": %s,\n\"n_vocab\": %d,\n\"add_bos\": %s,\n\"bos\": %d,\n\"eos\": %d,\n",
            json_str(argv[5]).c_str(), json_str(argv[6]).c_str(), llama_vocab_n_tokens(v),
            llama_vocab_get_add_bos(v) ? "true" : "false", llama_vocab_bos(v), llama_vocab_eos(v));
    fprintf(f, "\"note\": \"ids: add_special=false, parse_special=true; ids_add_special: add_special=true, parse_special=true; pieces: llama_token_to_piece(special=true) of ids\",\n\"cases\": [\n");
    for (size_t i = 0; i < strs.size(); i++) {
        auto ids = tokenize(v, strs[i], false, true);
        auto ids2 = tokenize(v, strs[i], true, true);
        std::string pcs = "[";
        for (size_t k = 0; k < ids.size(); k++) { if (k) pcs += ","; pcs += json_str(piece(v, ids[k])); }
        pcs += "]";
        fprintf(f, "  {\"text\": %s, \"ids\": %s, \"ids_add_special\": %s, \"pieces\": %s}%s\n", json_str(strs[i]).c_str(),
                json_arr(ids).c_str(), json_arr(ids2).c_str(), pcs.c_str(), i + 1 < strs.size() ? "," : "");
    }
    fprintf(f, "]\n}\n");
    fclose(f);
    llama_model_free(m);
    return 0;
}

static int cmd_generate(int argc, char ** argv) {
    if (argc < 8) { fprintf(stderr, "usage: generate MODEL OUT NAME VERSION N PROMPT...\n"); return 2; }
    llama_model * m = load(argv[2], false);
    const llama_vocab * v = llama_model_get_vocab(m);
    const int n_vocab = llama_vocab_n_tokens(v);
    int n_gen = atoi(argv[6]);
    FILE * f = open_out(argv[3]);
    fprintf(f, "{\n\"model\": %s,\n\"llama_cpp\": %s,\n", json_str(argv[4]).c_str(), json_str(argv[5]).c_str());
    fprintf(f, "\"config\": {\"n_threads\": 1, \"n_ctx\": 512, \"type_k\": \"f16\", \"type_v\": \"f16\", \"flash_attn\": \"auto\", \"sampling\": \"greedy (argmax over full vocab)\", \"prompt\": \"raw text, add_special=true (BOS per tokenizer.ggml.add_bos_token), parse_special=true\", \"stop\": \"none (does not stop at EOS)\"},\n");
    fprintf(f, "\"cases\": [\n");
    for (int p = 7; p < argc; p++) {
        llama_context * c = make_ctx(m, GGML_TYPE_F16, LLAMA_FLASH_ATTN_TYPE_AUTO);
        auto toks = tokenize(v, argv[p], true, true);
        llama_batch b = llama_batch_init(512, 0, 1);
        b.n_tokens = (int) toks.size();
        for (int i = 0; i < b.n_tokens; i++) { b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = i == b.n_tokens - 1; }
        decode_or_die(c, b);
        std::vector<int> out; std::vector<std::string> margins; std::string text;
        int pos = b.n_tokens;
        float mg; llama_token next = argmax(llama_get_logits_ith(c, -1), n_vocab, &mg);
        for (int s = 0; s < n_gen; s++) {
            out.push_back(next); margins.push_back(fmt_f(mg)); text += piece(v, next);
            b.n_tokens = 1; b.token[0] = next; b.pos[0] = pos++; b.n_seq_id[0] = 1; b.seq_id[0][0] = 0; b.logits[0] = 1;
            decode_or_die(c, b);
            next = argmax(llama_get_logits_ith(c, -1), n_vocab, &mg);
        }
        llama_batch_free(b); llama_free(c);
        std::string ms = "[";
        for (size_t i = 0; i < margins.size(); i++) { if (i) ms += ","; ms += margins[i]; }
        ms += "]";
        fprintf(f, "  {\"prompt\": %s, \"prompt_ids\": %s, \"greedy\": %s, \"greedy_margin\": %s, \"text\": %s}%s\n",
                json_str(argv[p]).c_str(), json_arr(toks).c_str(), json_arr(out).c_str(), ms.c_str(), json_str(text).c_str(), p + 1 < argc ? "," : "");
    }
    fprintf(f, "]\n}\n");
    fclose(f);
    llama_model_free(m);
    return 0;
}

int main(int argc, char ** argv) {
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    if (argc < 2) { fprintf(stderr, "usage: reference logits|tokenize|generate ...\n"); return 2; }
    std::string cmd = argv[1];
    int rc = cmd == "logits" ? cmd_logits(argc, argv) : cmd == "tokenize" ? cmd_tokenize(argc, argv) : cmd == "generate" ? cmd_generate(argc, argv) : 2;
    llama_backend_free();
    return rc;
}
