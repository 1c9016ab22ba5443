// Declaration-only stand-in (see ../README.md): ProcessGroupGloo.hpp calls
// `context->setTimeout` in an inline member it never runs from our code.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
