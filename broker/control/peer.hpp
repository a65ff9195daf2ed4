// One HTTP/1.1 request to another broker's API on its Unix socket: how a migrating broker asks
// its destination to prepare an incoming domain and watches it arrive.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/json/value.hpp>
#include <chrono>
#include <string>

#include "broker/core/error.hpp"

namespace broker {

struct PeerReply {
  unsigned status = 0;
  boost::json::value body;  // null when the body is empty or not JSON
};

// `method` "GET" or "POST"; `body` JSON text or empty. The whole exchange (connect, write, read)
// is bounded by `timeout`; a reply body over 1 MiB is refused.
boost::asio::awaitable<Result<PeerReply>> peer_request(boost::asio::any_io_executor ex,
                                                       std::string socket, std::string method,
                                                       std::string target, std::string body,
                                                       std::chrono::milliseconds timeout);

}  // namespace broker
