// A domain's QMP calls as broker results. A failure keeps the QMP layer's own code (qmp::errc:
// command_failed, timeout, disconnected...) and gains context in front of its message, so the one
// map from codes to HTTP statuses (broker/api/http_errors.cpp) answers for it, as it does for
// every other module's codes.
#pragma once

#include <chrono>
#include <string_view>

#include <boost/asio/awaitable.hpp>
#include <boost/json/value.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"
#include "qmp/commands.hpp"
#include "qmp/error.hpp"

namespace broker {

// `e` with `context` ("domain vm1", "blockdev-add qb-d1-fmt") in front; code, QMP class and desc
// unchanged.
Error from_qmp(const qmp::Error& e, std::string_view context);

// The domain's QMP client while its connection is open, else qemu_gone.
Result<qmp::Client*> qmp_client(Domain& d);

// One command with a deadline of `timeout`.
boost::asio::awaitable<Result<boost::json::value>> qmp_call(Domain& d, qmp::Command c,
                                                            std::chrono::milliseconds timeout);

}  // namespace broker
