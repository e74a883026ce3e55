// text/sft.cpp: SFT record formats -> (ids, labels).
// Chat records: the conversation is rendered once; each assistant turn's character span is found
// from renders of the conversation cut before and after it ({% generation %} blocks when the
// template has them), and the text is encoded span by span so labels follow the spans exactly.
#include "text/sft.h"

#include <fstream>
#include <sstream>

#include "core/check.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace automoe {

namespace {

using ojson = nlohmann::ordered_json;

std::string str_field(const ojson& rec, const char* key, const std::string& where) {
  AM_CHECK(rec.contains(key) && rec[key].is_string(), "{}: \"{}\" must be a string", where, key);
  return rec[key].get<std::string>();
}

std::string detect(const ojson& rec, const std::string& where) {
  AM_CHECK(rec.is_object(), "{}: a record must be a JSON object", where);
  if (rec.contains("input_ids")) return "tokens";
  if (rec.contains("messages")) return "messages";
  if (rec.contains("conversations")) return "sharegpt";
  if (rec.contains("instruction") && rec.contains("output")) return "alpaca";
  if (rec.contains("prompt") && rec.contains("completion")) return "prompt_completion";
  if (rec.contains("question") && rec.contains("answer")) return "prompt_completion";
  if (rec.contains("text")) return "text";
  std::string keys;
  for (auto& [k, _] : rec.items()) keys += (keys.empty() ? "" : ", ") + k;
  AM_FAIL("{}: cannot tell the record's format from its keys ({}); expected one of text, "
          "prompt/completion, question/answer, messages, conversations, instruction/output, input_ids",
          where, keys);
}

// ShareGPT / Alpaca -> OpenAI messages (+ tools).
ojson sharegpt_messages(const ojson& rec, const std::string& where, ojson* tools) {
  AM_CHECK(rec["conversations"].is_array(), "{}: \"conversations\" must be an array", where);
  ojson msgs = ojson::array();
  for (auto& t : rec["conversations"]) {
    AM_CHECK(t.is_object() && t.contains("from") && t.contains("value") && t["value"].is_string(),
             "{}: each conversation turn needs \"from\" and a string \"value\"", where);
    std::string from = t["from"].get<std::string>(), value = t["value"].get<std::string>();
    if (from == "human" || from == "user") msgs.push_back({{"role", "user"}, {"content", value}});
    else if (from == "gpt" || from == "assistant") msgs.push_back({{"role", "assistant"}, {"content", value}});
    else if (from == "system") msgs.push_back({{"role", "system"}, {"content", value}});
    else if (from == "observation" || from == "tool") msgs.push_back({{"role", "tool"}, {"content", value}});
    else if (from == "function_call") {
      ojson call;
      try {
        call = ojson::parse(value);
      } catch (const std::exception&) {
        AM_FAIL("{}: a function_call turn must hold JSON {{\"name\", \"arguments\"}}", where);
      }
      AM_CHECK(call.is_object() && call.contains("name"), "{}: a function_call needs a \"name\"", where);
      ojson fn = {{"name", call["name"]}, {"arguments", call.value("arguments", ojson::object())}};
      msgs.push_back({{"role", "assistant"}, {"content", ""},
                      {"tool_calls", ojson::array({{{"type", "function"}, {"function", fn}}})}});
    } else {
      AM_FAIL("{}: unknown ShareGPT speaker \"{}\" (human, gpt, system, function_call, observation)", where, from);
    }
  }
  if (rec.contains("system") && rec["system"].is_string() && !rec["system"].get<std::string>().empty())
    msgs.insert(msgs.begin(), ojson{{"role", "system"}, {"content", rec["system"]}});
  if (rec.contains("tools")) {
    ojson t = rec["tools"];
    if (t.is_string() && !t.get<std::string>().empty()) {
      try {
        t = ojson::parse(t.get<std::string>());
      } catch (const std::exception&) {
        AM_FAIL("{}: \"tools\" is a string but not JSON", where);
      }
    }
    if (t.is_array() && !t.empty()) {
      ojson wrapped = ojson::array();  // bare function schemas -> {"type": "function", "function": ...}
      for (auto& f : t) wrapped.push_back(f.contains("function") ? f : ojson{{"type", "function"}, {"function", f}});
      *tools = wrapped;
    }
  }
  return msgs;
}

// Appends `text` encoded, labelled or not.
void put(Example& ex, const Tokenizer& tok, std::string_view text, bool label) {
  for (int32_t id : tok.encode(text)) {
    ex.ids.push_back(id);
    ex.labels.push_back(label ? id : -100);
  }
}

// What the template writes after an assistant message's content ("<|im_end|>\n" for ChatML),
// found by rendering a probe conversation.
std::string end_of_turn(const ChatTemplate& chat, const SftOptions& opt) {
  const std::string probe = "\x01automoe-probe\x01";
  ojson msgs = ojson::array({{{"role", "user"}, {"content", "x"}}, {{"role", "assistant"}, {"content", probe}}});
  std::string r = chat.render(msgs, nullptr, false, opt.template_vars);
  size_t at = r.rfind(probe);
  std::string tail = at == std::string::npos ? std::string() : r.substr(at + probe.size());
  return tail.empty() ? chat.eos_token() : tail;
}

Example chat_example(const ojson& msgs, const ojson& tools, const Tokenizer& tok, const ChatTemplate& chat,
                     const SftOptions& opt, const std::string& where, SftStats* stats, std::string* rendered) {
  AM_CHECK(msgs.is_array() && !msgs.empty(), "{}: \"messages\" must be a non-empty array", where);
  std::vector<jinja::Span> gen;
  std::string full;
  try {
    full = chat.render(msgs, tools, false, opt.template_vars, &gen);
  } catch (const Error& e) {
    AM_FAIL("{}: {}", where, e.what());
  }
  if (rendered) *rendered = full;
  // Character spans [begin, end) of the assistant turns in `full`.
  std::vector<std::pair<size_t, size_t>> spans;
  if (!gen.empty()) {
    for (auto& s : gen) spans.emplace_back(s.begin, s.end);
  } else {
    const std::string eot = end_of_turn(chat, opt);
    for (size_t i = 0; i < msgs.size(); ++i) {
      if (msgs[i].value("role", "") != "assistant") continue;
      ojson before(msgs.begin(), msgs.begin() + i), upto(msgs.begin(), msgs.begin() + i + 1);
      std::string p = i ? chat.render(before, tools, true, opt.template_vars) : std::string();
      std::string f = chat.render(upto, tools, false, opt.template_vars);
      AM_CHECK(full.compare(0, p.size(), p) == 0,
               "{}: the chat template renders the conversation before assistant turn {} differently "
               "inside the whole conversation; cannot place the loss mask", where, i);
      size_t b = p.size(), e;
      if (full.compare(0, f.size(), f) == 0) {
        e = f.size();
      } else {
        // The template rewrote this turn inside the whole conversation (e.g. Qwen3 drops the
        // reasoning of earlier turns): the turn ends where the template's end-of-turn text ends.
        AM_CHECK(!eot.empty(), "{}: cannot find the end of assistant turn {}", where, i);
        e = full.find(eot, b);
        AM_CHECK(e != std::string::npos, "{}: cannot find the end of assistant turn {} ('{}')", where, i, eot);
        e += eot.size();
      }
      spans.emplace_back(b, e);
    }
  }
  Example ex;
  size_t at = 0;
  for (auto& [b, e] : spans) {
    if (b < at) continue;
    put(ex, tok, std::string_view(full).substr(at, b - at), opt.train_on_prompt);
    put(ex, tok, std::string_view(full).substr(b, e - b), true);
    at = e;
  }
  put(ex, tok, std::string_view(full).substr(at), opt.train_on_prompt);
  std::vector<int32_t> whole = tok.encode(full);
  if (stats && !std::equal(whole.begin(), whole.end(), ex.ids.begin(), ex.ids.end())) ++stats->boundary_mismatch;
  return ex;
}

}  // namespace

Example sft_example(const ojson& rec, const Tokenizer& tok, const ChatTemplate* chat, const SftOptions& opt,
                    const std::string& where, SftStats* stats, std::string* rendered) {
  std::string fmt_name = opt.format == "auto" ? detect(rec, where) : opt.format;
  Example ex;
  auto eos = [&](Example& e) {
    if (opt.add_eos && tok.eos_id() >= 0) {
      e.ids.push_back(tok.eos_id());
      e.labels.push_back(tok.eos_id());
    }
  };
  auto need_chat = [&]() -> const ChatTemplate& {
    AM_CHECK(chat != nullptr, "{}: a {} record needs the model's chat template (chat_template.jinja or "
             "tokenizer_config.json in the model directory)", where, fmt_name);
    return *chat;
  };
  if (fmt_name == "tokens") {
    AM_CHECK(rec["input_ids"].is_array(), "{}: \"input_ids\" must be an array", where);
    const int64_t vocab = tok.vocab_size();
    for (auto& v : rec["input_ids"]) {
      AM_CHECK(v.is_number_integer(), "{}: input_ids must hold integers", where);
      const int64_t id = v.get<int64_t>();
      AM_CHECK(id >= 0 && id < vocab, "{}: token id {} is outside the tokenizer's vocabulary [0, {})",
               where, id, vocab);
      ex.ids.push_back(id);
    }
    if (rec.contains("labels")) {
      AM_CHECK(rec["labels"].is_array() && rec["labels"].size() == ex.ids.size(),
               "{}: \"labels\" must be as long as input_ids", where);
      for (auto& v : rec["labels"]) {
        AM_CHECK(v.is_number_integer(), "{}: labels must hold integers", where);
        const int64_t y = v.get<int64_t>();
        AM_CHECK(y == -100 || (y >= 0 && y < vocab),
                 "{}: label {} is neither -100 nor inside the tokenizer's vocabulary [0, {})", where, y, vocab);
        ex.labels.push_back(y);
      }
    } else {
      ex.labels = ex.ids;
    }
    if (rendered) *rendered = tok.decode(std::vector<int32_t>(ex.ids.begin(), ex.ids.end()));
  } else if (fmt_name == "text") {
    std::string t = str_field(rec, "text", where);
    put(ex, tok, t, true);
    eos(ex);
    if (rendered) *rendered = t;
  } else if (fmt_name == "prompt_completion") {
    bool qa = !rec.contains("prompt");
    std::string p = str_field(rec, qa ? "question" : "prompt", where);
    std::string c = str_field(rec, qa ? "answer" : "completion", where);
    if (qa) p += "\n";  // GSM8K: the answer starts on its own line
    put(ex, tok, p, opt.train_on_prompt);
    put(ex, tok, c, true);
    eos(ex);
    if (rendered) *rendered = p + c;
  } else if (fmt_name == "messages") {
    ojson tools = rec.contains("tools") ? rec["tools"] : ojson(nullptr);
    ex = chat_example(rec["messages"], tools, tok, need_chat(), opt, where, stats, rendered);
  } else if (fmt_name == "sharegpt") {
    ojson tools = nullptr;
    ojson msgs = sharegpt_messages(rec, where, &tools);
    ex = chat_example(msgs, tools, tok, need_chat(), opt, where, stats, rendered);
  } else if (fmt_name == "alpaca") {
    std::string user = str_field(rec, "instruction", where);
    if (rec.contains("input") && rec["input"].is_string() && !rec["input"].get<std::string>().empty())
      user += "\n" + rec["input"].get<std::string>();
    ojson msgs = ojson::array();
    if (rec.contains("system") && rec["system"].is_string() && !rec["system"].get<std::string>().empty())
      msgs.push_back({{"role", "system"}, {"content", rec["system"]}});
    msgs.push_back({{"role", "user"}, {"content", user}});
    msgs.push_back({{"role", "assistant"}, {"content", str_field(rec, "output", where)}});
    ex = chat_example(msgs, nullptr, tok, need_chat(), opt, where, stats, rendered);
  } else {
    AM_FAIL("data.format '{}' is unknown; use auto, text, prompt_completion, messages, sharegpt, alpaca or tokens", fmt_name);
  }
  AM_CHECK(!ex.ids.empty(), "{}: the record encodes to no tokens", where);
  return ex;
}

std::vector<ojson> read_records(const std::string& path, std::vector<std::string>* where) {
  std::ifstream f(path, std::ios::binary);
  AM_CHECK(f.good(), "cannot open dataset file '{}'", path);
  std::vector<ojson> out;
  bool is_array = path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0;
  if (is_array) {
    std::stringstream ss;
    ss << f.rdbuf();
    ojson arr;
    try {
      arr = ojson::parse(ss.str());
    } catch (const nlohmann::json::parse_error& e) {
      AM_FAIL("{}: not valid JSON ({})", path, e.what());
    }
    AM_CHECK(arr.is_array(), "{}: a .json dataset must be an array of records (use .jsonl for one record per line)", path);
    for (size_t i = 0; i < arr.size(); ++i) {
      out.push_back(std::move(arr[i]));
      where->push_back(fmt::format("{} record {}", path, i));
    }
    return out;
  }
  std::string line;
  int64_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      out.push_back(ojson::parse(line));
    } catch (const nlohmann::json::parse_error& e) {
      out.push_back(ojson(nullptr));  // reported by the caller (it may skip bad lines)
      where->push_back(fmt::format("{}:{}: not valid JSON ({})", path, lineno, e.what()));
      continue;
    }
    where->push_back(fmt::format("{}:{}", path, lineno));
  }
  return out;
}

std::vector<Example> load_sft_file(const std::string& path, const Tokenizer& tok, const ChatTemplate* chat,
                                   const SftOptions& opt, SftStats* stats) {
  SftStats local;
  if (!stats) stats = &local;  // the counts are optional for the caller
  std::vector<std::string> where;
  std::vector<ojson> recs = read_records(path, &where);
  std::vector<Example> out;
  for (size_t i = 0; i < recs.size(); ++i) {
    ++stats->records;
    try {
      AM_CHECK(!recs[i].is_null(), "{}", where[i]);  // a line that was not JSON
      Example ex = sft_example(recs[i], tok, chat, opt, where[i], stats);
      stats->tokens += int64_t(ex.ids.size());
      for (auto y : ex.labels) stats->labelled += y != -100;
      out.push_back(std::move(ex));
    } catch (const Error& e) {
      if (!opt.skip_bad) throw;
      if (stats->skipped++ == 0) stats->first_error = e.what();
    }
  }
  AM_CHECK(!out.empty(), "dataset file '{}' holds no usable records", path);
  return out;
}

}  // namespace automoe
