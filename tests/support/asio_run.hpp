// Runs one coroutine to completion on an io_context and returns its value: the glue between
// Catch's synchronous test bodies and the broker's coroutines.
#pragma once

#include <exception>
#include <optional>
#include <utility>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

namespace qbtest {

template <class T>
T run(boost::asio::io_context& io, boost::asio::awaitable<T> task) {
  std::optional<T> out;
  std::exception_ptr error;
  boost::asio::co_spawn(io, std::move(task), [&](std::exception_ptr e, T v) {
    error = e;
    if (!e) out.emplace(std::move(v));
  });
  io.restart();
  while (!out && !error) {
    if (io.run_one() == 0) break;
  }
  if (error) std::rethrow_exception(error);
  return std::move(*out);
}

}  // namespace qbtest
