// A domain's QMP session: connecting to its QEMU's monitor socket, and the event pump that keeps
// the domain's run state and republishes QEMU's events on the event bus until QEMU goes away.
#pragma once

#include <functional>

#include <chrono>
#include <cstddef>
#include <memory>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"
#include "broker/domain/event_bus.hpp"
#include "qmp/client.hpp"

namespace broker {

struct SessionConfig {
  std::chrono::milliseconds start_timeout{30000};  // connect -> capabilities negotiated
  std::size_t qmp_max_line = 16u << 20;
  qmp::TranscriptHook transcript;  // every QMP line of every domain (audits, tests)
};

// Connects to the domain's QMP socket and negotiates capabilities; the client is set on `d`.
boost::asio::awaitable<Result<void>> connect_qmp(boost::asio::any_io_executor ex, Domain& d,
                                                 const SessionConfig& config);

// Follows the domain's QEMU events until the connection ends (QEMU exited or was closed): STOP,
// RESUME and SHUTDOWN move the run state, and every event is published on `bus`. `on_resume`, when
// set, is called after each RESUME.
boost::asio::awaitable<void> pump_events(std::shared_ptr<Domain> d, EventBus& bus,
                                         std::function<void()> on_resume = {});

}  // namespace broker
