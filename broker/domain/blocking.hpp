// Runs blocking work (spawning, kill by uid, file writes) on a thread pool and resumes the calling
// coroutine on its own executor with the result, so the io_context thread never waits on it.
#pragma once

#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace broker {

// `f` runs on `pool`; it wakes the caller by posting a timer cancel back to `ex`. The result lives
// in the caller's frame, which outlives the wait, so `f` may capture references to the caller's
// locals and parameters. Capture only those (or trivially copyable values): g++ 12 mis-copies
// closures with non-trivial members that are created inside a coroutine.
template <class F>
boost::asio::awaitable<std::invoke_result_t<F&>> run_blocking(boost::asio::any_io_executor ex,
                                                              boost::asio::thread_pool& pool, F f) {
  namespace asio = boost::asio;
  std::optional<std::invoke_result_t<F&>> result;
  auto done = std::make_shared<asio::steady_timer>(ex, asio::steady_timer::time_point::max());
  asio::post(pool, [&result, f, done, ex]() mutable {
    result.emplace(f());
    asio::post(ex, [done] { done->cancel(); });
  });
  co_await done->async_wait(asio::as_tuple(asio::use_awaitable));
  co_return std::move(*result);
}

}  // namespace broker
