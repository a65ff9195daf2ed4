// What the benchmarks of the warm pool share: waiting for it to fill, and stopping it.
#pragma once

#include <chrono>
#include <stdexcept>
#include <string>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/json/serialize.hpp>

#include "broker/domain/warm_pool.hpp"

namespace qbbench {

// Runs `io` until `pool` has a QEMU ready, and half a second more: a pooled QEMU waits for its
// request much longer than its machine set-up takes, which is not what is measured. Throws when
// the pool has not filled within a minute.
inline void wait_pooled(boost::asio::io_context& io, const broker::WarmPool& pool) {
  using namespace std::chrono_literals;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (pool.size() == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("the pool never filled: " +
                               boost::json::serialize(pool.to_json()));
    }
    io.restart();
    io.run_for(10ms);
  }
  io.restart();
  io.run_for(500ms);
}

// Stops the pool, as qbrokerd does on SIGTERM: its QEMUs are killed by uid.
inline boost::asio::awaitable<bool> stop_pool(broker::WarmPool& pool) {
  co_await pool.stop();
  co_return true;
}

}  // namespace qbbench
