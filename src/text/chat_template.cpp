// text/chat_template.cpp: finds a model's chat template and special tokens on disk and renders
// conversations with the variables transformers passes to the template.
#include "text/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

namespace automoe {
namespace fs = std::filesystem;

static std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  AM_CHECK(in, "cannot read {}", p.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

static nlohmann::ordered_json read_json(const fs::path& p) {
  try {
    return nlohmann::ordered_json::parse(read_file(p));
  } catch (const nlohmann::json::exception& e) {
    AM_FAIL("{} is not valid JSON: {}", p.string(), e.what());
  }
}

// tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}.
static std::map<std::string, std::string> templates_from(const nlohmann::ordered_json& t, const fs::path& file) {
  std::map<std::string, std::string> out;
  if (t.is_string()) {
    out["default"] = t.get<std::string>();
  } else if (t.is_array()) {
    for (const auto& e : t) {
      AM_CHECK(e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("template") && e["template"].is_string(),
               "{}: each chat_template entry must be {{\"name\": ..., \"template\": ...}}", file.string());
      out[e["name"].get<std::string>()] = e["template"].get<std::string>();
    }
  } else {
    AM_FAIL("{}: chat_template must be a string or a list of named templates, not {}", file.string(), t.type_name());
  }
  return out;
}

ChatTemplate ChatTemplate::load(const std::string& dir, jinja::Limits limits) {
  fs::path d(dir), config = d / "tokenizer_config.json";
  nlohmann::ordered_json cfg = fs::exists(config) ? read_json(config) : nlohmann::ordered_json::object();
  std::map<std::string, std::string> templates;
  if (fs::exists(d / "chat_template.jinja")) {
    templates["default"] = read_file(d / "chat_template.jinja");
  } else if (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) {
    templates = templates_from(cfg["chat_template"], config);
  } else if (fs::exists(d / "chat_template.json")) {
    nlohmann::ordered_json j = read_json(d / "chat_template.json");
    AM_CHECK(j.contains("chat_template"), "{} has no \"chat_template\" member", (d / "chat_template.json").string());
    templates = templates_from(j["chat_template"], d / "chat_template.json");
  } else {
    AM_FAIL("no chat template in {}: expected chat_template.jinja, or a chat_template in tokenizer_config.json", dir);
  }
  // Special tokens are strings or AddedToken objects {"content": ...}; null means unset.
  nlohmann::ordered_json special = nlohmann::ordered_json::object();
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    if (!cfg.contains(key)) continue;
    const auto& v = cfg[key];
    if (v.is_string()) special[key] = v;
    else if (v.is_object() && v.contains("content") && v["content"].is_string()) special[key] = v["content"];
  }
  if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array()) {
    nlohmann::ordered_json extra = nlohmann::ordered_json::array();
    for (const auto& v : cfg["additional_special_tokens"])
      extra.push_back(v.is_object() && v.contains("content") ? v["content"] : v);
    special["additional_special_tokens"] = extra;
  }
  return ChatTemplate(templates, std::move(special), limits);
}

ChatTemplate::ChatTemplate(const std::map<std::string, std::string>& templates, nlohmann::ordered_json special_tokens,
                           jinja::Limits limits)
    : special_tokens_(std::move(special_tokens)) {
  AM_CHECK(templates.count("default"), "a chat template set needs one named \"default\" ({} given)", templates.size());
  for (const auto& [name, source] : templates) {
    std::string label = name == "default" ? "chat template" : "chat template '" + name + "'";
    templates_.emplace(name, jinja::Template(source, label, limits));
  }
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                 bool add_generation_prompt, const nlohmann::ordered_json& extra_vars,
                                 std::vector<jinja::Span>* generation) const {
  AM_CHECK(messages.is_array(), "messages must be a JSON list of {{\"role\", \"content\"}} objects, not {}", messages.type_name());
  AM_CHECK(extra_vars.is_null() || extra_vars.is_object(), "extra template variables must be a JSON object, not {}",
           extra_vars.type_name());
  // As transformers: special tokens first, then the call's variables, then extra kwargs.
  nlohmann::ordered_json vars = special_tokens_;
  vars["messages"] = messages;
  vars["tools"] = tools;
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = add_generation_prompt;
  if (extra_vars.is_object())
    for (const auto& [k, v] : extra_vars.items()) vars[k] = v;
  // transformers picks a template named "tool_use" when tools are given and it exists.
  auto it = !tools.is_null() && templates_.count("tool_use") ? templates_.find("tool_use") : templates_.find("default");
  return it->second.render(vars, generation);
}

std::string ChatTemplate::token(const char* key) const {
  auto it = special_tokens_.find(key);
  return it != special_tokens_.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace automoe
