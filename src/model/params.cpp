// model/params.cpp: parameter layout bookkeeping.
#include "model/params.h"

namespace automoe {

int64_t ParamLayout::add(const std::string& name, Shape shape) {
  ParamSpec s{name, shape, total, numel_of(shape)};
  params.push_back(s);
  total += s.numel;
  return s.offset;
}

const ParamSpec& ParamLayout::find(const std::string& name) const {
  for (auto& p : params)
    if (p.name == name) return p;
  AM_FAIL("internal: no parameter named '{}'", name);
}

}  // namespace automoe
