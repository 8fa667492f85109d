// The error boundary of eqim's C ABI shims (c10d_shim.cpp, precision_shim.cpp): every exported
// function runs its body under `guard`, which catches every C++ exception and hands its message
// back through `err` (freed by the Rust side), so nothing unwinds across the FFI boundary.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace eqim_shim {

inline void set_err(char** err, const char* msg) {
  if (err == nullptr) return;
  *err = strdup(msg == nullptr ? "(no message)" : msg);
}

// Runs `body`; 0 on success, -1 with `*err` set when it threw.
template <typename F>
int guard(char** err, F&& body) noexcept {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, e.what());
  } catch (...) {
    set_err(err, "unknown C++ exception");
  }
  return -1;
}

}  // namespace eqim_shim
