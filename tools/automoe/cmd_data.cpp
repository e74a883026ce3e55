// tools/automoe/cmd_data.cpp: `automoe data preview`: a few records as the model will see them,
// with the tokens that carry loss marked, and token statistics (lengths, packing efficiency).
#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "commands.h"
#include "core/check.h"
#include "text/chat_template.h"
#include "text/sft.h"
#include "text/tokenizer.h"

namespace automoe::cli {

namespace fs = std::filesystem;

void add_data(CLI::App& app, Runners& runners) {
  auto* data = app.add_subcommand("data", "Inspect datasets");
  auto* pv = data->add_subcommand("preview", "Show records with loss-carrying text in [[ ]] and token statistics");
  struct Opts {
    std::string model, file, format = "auto", thinking;
    int64_t n = 3, seq_len = 2048;
    bool train_on_prompt = false;
  };
  auto o = std::make_shared<Opts>();
  pv->add_option("--model", o->model, "model (or tokenizer) directory: tokenizer.json and chat template")->required();
  pv->add_option("--data", o->file, "dataset file (.jsonl or .json)")->required();
  pv->add_option("--format", o->format, "auto | text | prompt_completion | messages | sharegpt | alpaca | tokens");
  pv->add_option("-n", o->n, "records to show (default 3)");
  pv->add_option("--seq-len", o->seq_len, "row length for the packing statistics (default 2048)");
  pv->add_flag("--train-on-prompt", o->train_on_prompt, "loss on prompt tokens too");
  pv->add_option("--enable-thinking", o->thinking, "true | false: passed to the chat template");
  runners.push_back([pv, o]() -> int {
    if (!pv->parsed()) return -1;
    Tokenizer tok = Tokenizer::load(o->model);
    std::unique_ptr<ChatTemplate> chat;
    try {
      chat = std::make_unique<ChatTemplate>(ChatTemplate::load(fs::is_directory(o->model) ? o->model : fs::path(o->model).parent_path().string()));
    } catch (const Error& e) {
      std::fprintf(stderr, "note: no chat template (%s); chat-shaped records will fail\n", e.what());
    }
    SftOptions opt;
    opt.format = o->format;
    opt.train_on_prompt = o->train_on_prompt;
    opt.skip_bad = true;
    if (!o->thinking.empty()) opt.template_vars = {{"enable_thinking", o->thinking == "true"}};
    std::vector<std::string> where;
    auto recs = read_records(o->file, &where);
    SftStats st;
    std::vector<int64_t> lens;
    int64_t shown = 0, labelled = 0, truncated = 0;
    std::vector<Example> all;
    for (size_t i = 0; i < recs.size(); ++i) {
      try {
        AM_CHECK(!recs[i].is_null(), "{}", where[i]);
        Example ex = sft_example(recs[i], tok, chat.get(), opt, where[i], &st);
        if (shown < o->n) {
          // decode runs of equal mask state; labelled runs in [[ ]]
          std::printf("--- %s (%zu tokens)\n", where[i].c_str(), ex.ids.size());
          size_t a = 0;
          while (a < ex.ids.size()) {
            bool lab = ex.labels[a] != -100;
            size_t b = a;
            std::vector<int32_t> run;
            while (b < ex.ids.size() && (ex.labels[b] != -100) == lab) run.push_back(int32_t(ex.ids[b++]));
            std::string t = tok.decode(run);
            std::printf(lab ? "[[%s]]" : "%s", t.c_str());
            a = b;
          }
          std::printf("\n");
          ++shown;
        }
        lens.push_back(int64_t(ex.ids.size()));
        for (auto y : ex.labels) labelled += y != -100;
        truncated += int64_t(ex.ids.size()) > o->seq_len;
        all.push_back(std::move(ex));
      } catch (const Error& e) {
        if (st.skipped++ == 0) st.first_error = e.what();
      }
    }
    AM_CHECK(!lens.empty(), "no usable records in {} (first error: {})", o->file, st.first_error);
    std::vector<int64_t> s = lens;
    std::sort(s.begin(), s.end());
    int64_t total = 0;
    for (auto l : s) total += l;
    // packing efficiency: greedy packing of the whole set into rows of seq_len
    DataOrder order;
    order.reset(0, int64_t(all.size()));
    for (int64_t i = 0; i < order.n; ++i) order.perm[i] = i;  // file order
    int64_t rows = 0, real = 0;
    while (order.epoch == 0) {
      PackedBatch pb = pack_rows(all, order, 1, o->seq_len, 0);
      ++rows;
      real += pb.real_tokens;
      if (order.cursor >= order.n) break;
    }
    std::printf("\n%zu records (%lld skipped%s%s)\n", s.size(), (long long)st.skipped,
                st.skipped ? ", first: " : "", st.first_error.c_str());
    std::printf("tokens: %lld total, %lld carry loss (%.1f%%)\n", (long long)total, (long long)labelled,
                100.0 * double(labelled) / double(std::max<int64_t>(total, 1)));
    std::printf("length: min %lld | median %lld | p95 %lld | max %lld | mean %.1f\n", (long long)s.front(),
                (long long)s[s.size() / 2], (long long)s[std::min(s.size() - 1, s.size() * 95 / 100)],
                (long long)s.back(), double(total) / double(s.size()));
    std::printf("packing into rows of %lld: %lld rows, %.1f%% of row tokens are real, %lld records truncated\n",
                (long long)o->seq_len, (long long)rows, 100.0 * double(real) / double(rows * o->seq_len),
                (long long)truncated);
    return 0;
  });
}

}  // namespace automoe::cli
