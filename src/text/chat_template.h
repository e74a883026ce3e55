// text/chat_template.h: a model's chat template, rendered as transformers' apply_chat_template
// renders it (messages, tools, add_generation_prompt, special tokens and extra variables such
// as enable_thinking), so that training text matches what the model saw byte for byte.
#pragma once
#include <nlohmann/json.hpp>

#include <map>
#include <string>
#include <vector>

#include "text/jinja.h"

namespace automoe {

class ChatTemplate {
 public:
  // Reads `dir`/chat_template.jinja, else the chat_template of tokenizer_config.json (a string,
  // or a list of {name, template}), else chat_template.json; special tokens come from
  // tokenizer_config.json when it exists.
  static ChatTemplate load(const std::string& dir, jinja::Limits limits = {});

  // `templates` maps names to sources ("default", and e.g. "tool_use"); `special_tokens` is an
  // object such as {"eos_token": "<|im_end|>"} whose members become template variables.
  ChatTemplate(const std::map<std::string, std::string>& templates, nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object(),
               jinja::Limits limits = {});

  // The prompt text for `messages` (a list of {role, content, ...}); `tools` may be null;
  // `extra_vars` (an object or null) adds variables like {"enable_thinking": false}. When given,
  // `generation` receives the output ranges of {% generation %} blocks.
  std::string render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools, bool add_generation_prompt,
                     const nlohmann::ordered_json& extra_vars = nullptr, std::vector<jinja::Span>* generation = nullptr) const;

  // Special token strings, "" when the tokenizer config does not set them.
  std::string bos_token() const { return token("bos_token"); }
  std::string eos_token() const { return token("eos_token"); }
  std::string pad_token() const { return token("pad_token"); }
  const nlohmann::ordered_json& special_tokens() const { return special_tokens_; }

 private:
  std::string token(const char* key) const;
  std::map<std::string, jinja::Template> templates_;
  nlohmann::ordered_json special_tokens_;
};

}  // namespace automoe
