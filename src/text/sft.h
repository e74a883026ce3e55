// text/sft.h: supervised fine-tuning datasets: JSONL or JSON-array files in the common formats,
// turned into token ids with loss labels through the model's tokenizer and chat template.
//
// Formats (detected per record with format "auto", or forced):
//   text                {"text": "..."}                                  loss on every token
//   prompt_completion   {"prompt": "...", "completion": "..."}           loss on the completion
//                       (also {"question", "answer"} as GSM8K writes it)
//   messages            {"messages": [{role, content, tool_calls?}], "tools"?: [...]}
//   sharegpt            {"conversations": [{from, value}], "tools"?: "..."}  (human/gpt/system/
//                       function_call/observation)
//   alpaca              {"instruction", "input"?, "output", "system"?}
//   tokens              {"input_ids": [...], "labels"?: [...]}
// Chat-shaped records (messages, sharegpt, alpaca) are rendered with the chat template; loss on
// assistant turns only unless train_on_prompt.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "text/dataset.h"

namespace automoe {

class Tokenizer;
class ChatTemplate;

struct SftOptions {
  std::string format = "auto";
  bool train_on_prompt = false;  // loss on prompt/user tokens too
  bool add_eos = true;           // text and prompt/completion records end with the eos token
  bool skip_bad = false;         // skip malformed records (counted) instead of failing
  nlohmann::ordered_json template_vars = nullptr;  // e.g. {"enable_thinking": false}
};

struct SftStats {
  int64_t records = 0, skipped = 0, tokens = 0, labelled = 0;
  int64_t boundary_mismatch = 0;  // records whose segment-wise encoding differed from the whole text
  std::string first_error;        // the first skipped record's error
};

// One record -> ids/labels. `where` names the file and line for errors. `chat` may be null when
// no chat-shaped record is present.
Example sft_example(const nlohmann::ordered_json& rec, const Tokenizer& tok, const ChatTemplate* chat,
                    const SftOptions& opt, const std::string& where, SftStats* stats,
                    std::string* rendered = nullptr);

// Reads a .jsonl (one record per line) or .json (an array of records) file.
std::vector<Example> load_sft_file(const std::string& path, const Tokenizer& tok, const ChatTemplate* chat,
                                   const SftOptions& opt, SftStats* stats /*nullable*/);

// Reads records without tokenizing (for previews); `where` gets "file:line" per record.
std::vector<nlohmann::ordered_json> read_records(const std::string& path, std::vector<std::string>* where);

}  // namespace automoe
