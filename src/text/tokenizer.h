// text/tokenizer.h: the byte-level BPE tokenizer of Hugging Face models (Qwen2/3, GPT-2, Llama-3,
// DeepSeek), loaded from tokenizer.json or from the slow vocab.json + merges.txt pair, encoding
// to exactly the ids HF `tokenizers` gives. Immutable after load; encode is safe from many threads
// (each thread keeps its own cache of BPE results per pre-token).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace automoe {

class Tokenizer {
 public:
  // `path`: a tokenizer.json file, or a directory holding tokenizer.json (preferred) or
  // vocab.json + merges.txt. tokenizer_config.json beside it, when present, gives bos/eos/pad
  // (and for the slow format the tokenizer class and the added tokens). Throws automoe::Error
  // naming the file and the problem for missing files, bad JSON and unsupported tokenizer types.
  static Tokenizer load(const std::string& path);

  // Token ids of UTF-8 `text` (invalid UTF-8 is an error). Added tokens in the text (e.g.
  // "<|im_end|>") are matched first; add_special_tokens applies the post-processor (e.g. BOS).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // The text of `ids`; invalid UTF-8 from partial byte tokens becomes U+FFFD, ids without a
  // token are dropped (as HF does), negative ids are an error. skip_special drops special tokens.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  int32_t token_to_id(std::string_view token) const;  // -1 when absent; tokens as in the vocab ("Ġthe")
  std::string id_to_token(int32_t id) const;           // "" when the id has no token
  int32_t vocab_size() const;                          // highest id of vocab and added tokens, plus one
  bool is_special(int32_t id) const;                   // a special added token
  int32_t bos_id() const;                              // -1 when the tokenizer config sets none
  int32_t eos_id() const;
  int32_t pad_id() const;
  const std::string& bos_token() const;                // "" when none
  const std::string& eos_token() const;
  const std::string& pad_token() const;
  const std::string& source() const;                   // the file(s) it was loaded from

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

}  // namespace automoe
