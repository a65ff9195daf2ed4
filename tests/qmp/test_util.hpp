// Helpers for the qmp tests: drive coroutines on an io_context, read this process's memory.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <exception>
#include <fstream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace qbtest {

// Runs `a` on `io` until it completes (other work, such as a client's reader, may remain).
// Every await in the code under test has a deadline, so this always returns.
template <class T>
T run(boost::asio::io_context& io, boost::asio::awaitable<T> a) {
  std::optional<T> out;
  std::exception_ptr ex;
  bool done = false;
  boost::asio::co_spawn(io, std::move(a), [&](std::exception_ptr e, T v) {
    ex = e;
    if (!e) out.emplace(std::move(v));
    done = true;
  });
  io.restart();
  while (!done) {
    if (io.run_one() == 0 && !done) throw std::runtime_error("io_context ran out of work");
  }
  if (ex) std::rethrow_exception(ex);
  return std::move(*out);
}

inline void run(boost::asio::io_context& io, boost::asio::awaitable<void> a) {
  std::exception_ptr ex;
  bool done = false;
  boost::asio::co_spawn(io, std::move(a), [&](std::exception_ptr e) {
    ex = e;
    done = true;
  });
  io.restart();
  while (!done) {
    if (io.run_one() == 0 && !done) throw std::runtime_error("io_context ran out of work");
  }
  if (ex) std::rethrow_exception(ex);
}

// Runs what is ready now (completions already queued), without blocking.
inline void drain(boost::asio::io_context& io) {
  io.restart();
  io.poll();
}

// Starts `a` on `io`; the result lands in the returned slot when it completes.
template <class T>
std::shared_ptr<std::optional<T>> spawn(boost::asio::io_context& io, boost::asio::awaitable<T> a) {
  auto slot = std::make_shared<std::optional<T>>();
  boost::asio::co_spawn(io, std::move(a), [slot](std::exception_ptr e, T v) {
    if (e) std::rethrow_exception(e);
    slot->emplace(std::move(v));
  });
  return slot;
}

// Runs handlers until `done()` holds. Every wait under test has a deadline, so this ends.
template <class Pred>
void run_until(boost::asio::io_context& io, Pred done) {
  io.restart();
  while (!done()) {
    if (io.run_one() == 0 && !done()) throw std::runtime_error("io_context ran out of work");
  }
}

// A "Vm..." field of /proc/self/status in KiB (VmRSS, VmHWM).
inline std::size_t proc_status_kib(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string k;
  std::size_t v = 0;
  while (in >> k) {
    if (k == key + ":") {
      in >> v;
      return v;
    }
    std::getline(in, k);
  }
  return 0;
}

}  // namespace qbtest
