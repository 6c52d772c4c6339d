// Runs an exported Gemma 3n program (model.pte, optionally with ple.ptd) through ExecuTorch's C++ Module, the way
// Android's LlmModule loads it, and prints one JSON object with load time, prefill and decode speed and resident
// memory (VmRSS, RssAnon, RssFile, and the resident bytes of the .pte and .ptd mappings from /proc/self/smaps).
//
// Usage:
//   et_runner --pte model.pte [--ptd ple.ptd] [--load-mode mmap|mlock|file] [--prompt-len 64] [--gen-len 64]
//             [--threads 0] [--seed 0] [--vocab N] [--sample-every 16] [--advice none|random|normal]
//             [--drop-cache 0|1]
//
// Prompt and decode inputs are random token ids in [0, vocab) from a fixed seed. Decode feeds a fresh random id at
// every step instead of the argmax, so that each step reads a PLE row it has most likely not read before; the argmax
// over the last logits row is still computed so the work per step matches greedy decoding.
//
// Linux only: the memory figures come from /proc/self/status and /proc/self/smaps.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

// The pip package ships libexecutorch_threadpool.so but not threadpool.h, so the two entry points used here are
// declared by hand. Their mangled names match the exported symbols; the return value of the reset is not used.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  void _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::extension::make_tensor_ptr;
using executorch::extension::module::Module;
using executorch::runtime::EValue;

namespace {

struct Options {
  std::string pte;
  std::string ptd;
  std::string load_mode = "mmap";
  int prompt_len = 64;
  int gen_len = 64;
  int threads = 0;  // 0 keeps ExecuTorch's default (one thread per core)
  uint64_t seed = 0;
  int64_t vocab = 0;  // 0 reads get_vocab_size from the program
  int sample_every = 16;
  std::string advice = "none";  // madvise applied to the .ptd mappings after load: none, random, normal
  bool drop_cache = false;  // evict the .ptd from the page cache before loading, so faults read from disk
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "et_runner: %s\n", message.c_str());
  std::exit(1);
}

Options parse_args(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) fail("missing value after " + flag);
    std::string value = argv[++i];
    if (flag == "--pte") options.pte = value;
    else if (flag == "--ptd") options.ptd = value;
    else if (flag == "--load-mode") options.load_mode = value;
    else if (flag == "--prompt-len") options.prompt_len = std::stoi(value);
    else if (flag == "--gen-len") options.gen_len = std::stoi(value);
    else if (flag == "--threads") options.threads = std::stoi(value);
    else if (flag == "--seed") options.seed = std::stoull(value);
    else if (flag == "--vocab") options.vocab = std::stoll(value);
    else if (flag == "--sample-every") options.sample_every = std::stoi(value);
    else if (flag == "--advice") options.advice = value;
    else if (flag == "--drop-cache") options.drop_cache = value == "1";
    else fail("unknown option " + flag);
  }
  if (options.pte.empty()) fail("--pte is required");
  if (options.prompt_len < 1) fail("--prompt-len must be at least 1");
  if (options.gen_len < 0) fail("--gen-len must not be negative");
  if (options.sample_every < 1) fail("--sample-every must be at least 1");
  if (options.advice != "none" && options.advice != "random" && options.advice != "normal") {
    fail("invalid --advice " + options.advice + "; use none, random or normal");
  }
  return options;
}

Module::LoadMode parse_load_mode(const std::string& name) {
  if (name == "mmap") return Module::LoadMode::Mmap;
  // Locks the mapped pages once touched; failures to lock (RLIMIT_MEMLOCK) are ignored as LlmModule does.
  if (name == "mlock") return Module::LoadMode::MmapUseMlockIgnoreErrors;
  if (name == "file") return Module::LoadMode::File;
  fail("invalid --load-mode " + name + "; use mmap, mlock or file");
}

// Memory of this process in bytes, from /proc/self/status.
struct Status {
  int64_t vm_rss = 0, vm_hwm = 0, rss_anon = 0, rss_file = 0;
};

Status read_status() {
  Status status;
  std::ifstream file("/proc/self/status");
  std::string key;
  int64_t kib = 0;
  std::string line;
  while (std::getline(file, line)) {
    std::istringstream fields(line);
    if (!(fields >> key >> kib)) continue;
    if (key == "VmRSS:") status.vm_rss = kib * 1024;
    else if (key == "VmHWM:") status.vm_hwm = kib * 1024;
    else if (key == "RssAnon:") status.rss_anon = kib * 1024;
    else if (key == "RssFile:") status.rss_file = kib * 1024;
  }
  return status;
}

// Resets VmHWM to the current VmRSS (Linux 4.0+), so the next peak covers only what follows.
void reset_peak() {
  std::ofstream("/proc/self/clear_refs") << "5";
}

// Resident bytes of every mapping of `path` (summed over its mapped ranges), from /proc/self/smaps.
int64_t mapping_rss(const std::string& path) {
  if (path.empty()) return 0;
  char resolved[PATH_MAX];
  if (realpath(path.c_str(), resolved) == nullptr) return 0;
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  int64_t total = 0;
  while (std::getline(smaps, line)) {
    // A mapping header starts with "start-end perms offset dev inode [path]"; field lines start with "Name:".
    auto first_space = line.find(' ');
    if (first_space != std::string::npos && line.find('-') < first_space) {
      auto slash = line.find('/');
      inside = slash != std::string::npos && line.compare(slash, std::string::npos, resolved) == 0;
    } else if (inside && line.rfind("Rss:", 0) == 0) {
      total += std::strtoll(line.c_str() + 4, nullptr, 10) * 1024;
    }
  }
  return total;
}

// Applies madvise(advice) to every mapping of `path`. The kernel reads ahead around each page fault of a file mapping
// (up to the device's read_ahead_kb), so without MADV_RANDOM one PLE row can bring megabytes of neighbors with it.
int apply_advice(const std::string& path, int advice) {
  char resolved[PATH_MAX];
  if (path.empty() || realpath(path.c_str(), resolved) == nullptr) return 0;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int count = 0;
  while (std::getline(maps, line)) {
    auto slash = line.find('/');
    if (slash == std::string::npos || line.compare(slash, std::string::npos, resolved) != 0) continue;
    uintptr_t start = std::stoull(line.substr(0, line.find('-')), nullptr, 16);
    uintptr_t end = std::stoull(line.substr(line.find('-') + 1, line.find(' ') - line.find('-') - 1), nullptr, 16);
    if (madvise(reinterpret_cast<void*>(start), end - start, advice) == 0) ++count;
  }
  return count;
}

// Evicts the clean page-cache pages of `path`, so that the run starts as a freshly booted device would.
void drop_page_cache(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("cannot open " + path);
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  close(fd);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Runs forward(tokens, input_pos) and returns the argmax of the last logits row.
int64_t run_forward(Module& module, std::vector<int64_t>& tokens, int64_t input_pos) {
  auto tokens_tensor = make_tensor_ptr({1, static_cast<int>(tokens.size())}, tokens.data(),
                                       executorch::aten::ScalarType::Long);
  int64_t position = input_pos;
  auto pos_tensor = make_tensor_ptr({1}, &position, executorch::aten::ScalarType::Long);
  auto outputs = module.forward({EValue(tokens_tensor), EValue(pos_tensor)});
  if (!outputs.ok()) fail("forward failed with error " + std::to_string(static_cast<int>(outputs.error())));
  const auto& logits = outputs->at(0).toTensor();
  const int64_t vocab = logits.size(logits.dim() - 1);
  const float* last = logits.const_data_ptr<float>() + (logits.numel() - vocab);
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i) {
    if (last[i] > last[best]) best = i;
  }
  return best;
}

int64_t constant_method(Module& module, const char* name) {
  auto value = module.get(name);
  if (!value.ok()) fail(std::string("method ") + name + " failed; is this a g3n-export program?");
  return value->toInt();
}

// Feeds the prompt in calls of at most call_len tokens, as ExecuTorch's TextPrefiller does, and returns the argmax
// of the last call's last logits row.
int64_t prefill(Module& module, const std::vector<int64_t>& prompt, int64_t call_len) {
  int64_t next = 0;
  for (size_t start = 0; start < prompt.size(); start += call_len) {
    const size_t end = std::min(prompt.size(), start + static_cast<size_t>(call_len));
    std::vector<int64_t> chunk(prompt.begin() + start, prompt.begin() + end);
    next = run_forward(module, chunk, static_cast<int64_t>(start));
  }
  return next;
}

void print_status(const char* name, const Status& status, bool comma = true) {
  std::printf("  \"%s\": {\"vm_rss\": %lld, \"vm_hwm\": %lld, \"rss_anon\": %lld, \"rss_file\": %lld}%s\n", name,
              static_cast<long long>(status.vm_rss), static_cast<long long>(status.vm_hwm),
              static_cast<long long>(status.rss_anon), static_cast<long long>(status.rss_file), comma ? "," : "");
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse_args(argc, argv);
  if (options.threads > 0) {
    executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(options.threads);
  }
  if (options.drop_cache && !options.ptd.empty()) drop_page_cache(options.ptd);
  const Status start = read_status();
  reset_peak();

  auto load_start = std::chrono::steady_clock::now();
  const Module::LoadMode mode = parse_load_mode(options.load_mode);
  std::unique_ptr<Module> module = options.ptd.empty() ? std::make_unique<Module>(options.pte, mode)
                                                        : std::make_unique<Module>(options.pte, options.ptd, mode);
  if (module->load() != executorch::runtime::Error::Ok) fail("loading " + options.pte + " failed");
  if (module->load_method("forward") != executorch::runtime::Error::Ok) {
    fail("loading method forward failed (is the .ptd missing or the wrong one?)");
  }
  const double load_s = seconds_since(load_start);
  int advised = 0;
  if (options.advice != "none") {
    advised = apply_advice(options.ptd, options.advice == "random" ? MADV_RANDOM : MADV_NORMAL);
  }
  // get_max_seq_len is the maximum number of tokens per call, and get_max_context_len the KV cache length.
  const int64_t call_len = constant_method(*module, "get_max_seq_len");
  const int64_t context_len = constant_method(*module, "get_max_context_len");
  const int64_t vocab = options.vocab > 0 ? options.vocab : constant_method(*module, "get_vocab_size");
  if (options.prompt_len + options.gen_len > context_len) {
    fail("prompt-len + gen-len exceed the program's KV cache of " + std::to_string(context_len) + " positions");
  }
  const Status after_load = read_status();
  const int64_t ptd_rss_after_load = mapping_rss(options.ptd);
  reset_peak();

  std::mt19937_64 random(options.seed);
  std::uniform_int_distribution<int64_t> token_ids(0, vocab - 1);
  std::vector<int64_t> prompt(options.prompt_len);
  for (auto& id : prompt) id = token_ids(random);
  std::set<int64_t> seen(prompt.begin(), prompt.end());

  // The first call pays one-time costs (allocations, page faults on weights), so it is timed apart.
  auto first_start = std::chrono::steady_clock::now();
  prefill(*module, prompt, call_len);
  const double first_call_s = seconds_since(first_start);
  auto prefill_start = std::chrono::steady_clock::now();
  prefill(*module, prompt, call_len);
  const double prefill_s = seconds_since(prefill_start);
  const Status after_prefill = read_status();
  const int64_t ptd_rss_after_prefill = mapping_rss(options.ptd);

  std::ostringstream samples;
  double decode_s = 0;
  for (int step = 0; step < options.gen_len; ++step) {
    std::vector<int64_t> token{token_ids(random)};
    seen.insert(token[0]);
    auto step_start = std::chrono::steady_clock::now();
    run_forward(*module, token, options.prompt_len + step);
    decode_s += seconds_since(step_start);
    if ((step + 1) % options.sample_every == 0 || step + 1 == options.gen_len) {
      Status now = read_status();
      samples << (samples.tellp() > 0 ? ",\n    " : "\n    ") << "{\"decoded\": " << step + 1
              << ", \"distinct_ids\": " << seen.size() << ", \"vm_rss\": " << now.vm_rss
              << ", \"rss_anon\": " << now.rss_anon << ", \"rss_file\": " << now.rss_file
              << ", \"ptd_rss\": " << mapping_rss(options.ptd) << ", \"pte_rss\": " << mapping_rss(options.pte)
              << "}";
    }
  }
  const Status steady = read_status();

  std::printf("{\n");
  std::printf("  \"runner\": \"et_runner\", \"load_mode\": \"%s\", \"threads\": %d,\n", options.load_mode.c_str(),
              options.threads);
  std::printf("  \"pte\": \"%s\", \"ptd\": \"%s\",\n", options.pte.c_str(), options.ptd.c_str());
  std::printf("  \"advice\": \"%s\", \"advised_mappings\": %d, \"drop_cache\": %s,\n", options.advice.c_str(), advised,
              options.drop_cache ? "true" : "false");
  std::printf("  \"prompt_len\": %d, \"gen_len\": %d, \"vocab\": %lld, \"distinct_ids\": %zu,\n", options.prompt_len,
              options.gen_len, static_cast<long long>(vocab), seen.size());
  std::printf("  \"load_s\": %.6f, \"first_call_s\": %.6f, \"prefill_s\": %.6f, \"decode_s\": %.6f,\n", load_s,
              first_call_s, prefill_s, decode_s);
  print_status("start", start);
  print_status("after_load", after_load);
  print_status("after_prefill", after_prefill);
  print_status("steady", steady);
  std::printf("  \"ptd_rss_after_load\": %lld, \"ptd_rss_after_prefill\": %lld, \"ptd_rss_steady\": %lld,\n",
              static_cast<long long>(ptd_rss_after_load), static_cast<long long>(ptd_rss_after_prefill),
              static_cast<long long>(mapping_rss(options.ptd)));
  std::printf("  \"pte_rss_steady\": %lld,\n", static_cast<long long>(mapping_rss(options.pte)));
  std::printf("  \"samples\": [%s\n  ]\n}\n", samples.str().c_str());
  return 0;
}
