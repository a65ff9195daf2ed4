#include "broker/daemon/migration_gateway.hpp"

#include <sys/socket.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>

#include "broker/api/http_errors.hpp"
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "fdpass/devices.hpp"

namespace broker::daemon {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using asio::ip::tcp;

namespace {

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);
constexpr auto kHandshake = std::chrono::seconds(10);
constexpr std::size_t kMaxRequest = 1 << 20;

// {"status": N, "body": the API's error body}.
json::object error_message(const Error& e) {
  auto cls = api::classify(e.code);
  return json::object{{"status", static_cast<unsigned>(cls.status)}, {"body", api::error_body(e)}};
}

awaitable<void> run_relay_to(std::shared_ptr<MigrationLink> link, fdpass::UniqueFd local) {
  auto r = co_await link->relay_to(std::move(local));
  if (!r) log::warn(r.error().describe());
}

// The request line: {"domain": {...}, "paused": bool}.
awaitable<void> run_relay_both_ways(std::shared_ptr<MigrationLink> link, fdpass::UniqueFd local) {
  auto r = co_await relay_both_ways(std::move(link), std::move(local));
  if (!r) log::warn(r.error().describe());
}

}  // namespace

MigrationGateway::MigrationGateway(asio::any_io_executor ex, Broker& broker,
                                   std::shared_ptr<asio::ssl::context> tls)
    : ex_(ex), broker_(broker), tls_(std::move(tls)), acceptor_(ex) {}

MigrationGateway::~MigrationGateway() {
  stop();
}

Result<void> MigrationGateway::listen(const tcp::endpoint& at) {
  boost::system::error_code ec;
  auto fail = [&](const char* what) {
    Error e(make_error_code(errc::invalid_argument),
            std::string("--migration-listen: ") + what + ": " + ec.message());
    e.field = "migration-listen";
    return e;
  };
  acceptor_.open(at.protocol(), ec);
  if (ec) return fail("socket");
  acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (at.address().is_v6() && at.address().is_unspecified()) {
    acceptor_.set_option(asio::ip::v6_only(false), ec);  // *:PORT takes IPv4 too
  }
  acceptor_.bind(at, ec);
  if (ec) return fail("bind");
  acceptor_.listen(8, ec);
  if (ec) return fail("listen");
  return {};
}

tcp::endpoint MigrationGateway::local_endpoint() const {
  boost::system::error_code ec;
  return acceptor_.local_endpoint(ec);
}

void MigrationGateway::start() {
  asio::co_spawn(ex_, accept_loop(), asio::detached);
}

void MigrationGateway::stop() {
  stopped_ = true;
  boost::system::error_code ignored;
  acceptor_.close(ignored);
  for (const auto& l : links_) l->close();
}

awaitable<void> MigrationGateway::accept_loop() {
  while (!stopped_) {
    auto [ec, sock] = co_await acceptor_.async_accept(kAwait);
    if (stopped_ || ec == asio::error::operation_aborted) co_return;
    if (ec) {
      log::warn("migration listener: accept: " + ec.message());
      continue;
    }
    asio::co_spawn(ex_, serve(std::move(sock)), asio::detached);
  }
}

awaitable<void> MigrationGateway::serve(tcp::socket sock) {
  auto accepted = co_await MigrationLink::accept(std::move(sock), tls_, kHandshake);
  if (!accepted) {
    log::warn(accepted.error().describe());
    co_return;
  }
  std::shared_ptr<MigrationLink> link = std::move(*accepted);
  links_.insert(link);
  const std::string peer = link->peer();
  auto request = co_await link->read_message(kMaxRequest, kHandshake);
  if (request && request->as_object().contains("nbd")) {
    co_await serve_nbd(link, *request);
    links_.erase(link);
    co_return;
  }
  if (request && request->as_object().contains("query")) {
    co_await serve_query(link, *request);
    links_.erase(link);
    co_return;
  }
  Result<IncomingDomain> asked =
      request ? parse_incoming(*request) : Result<IncomingDomain>(request.error());
  if (!asked) {
    log::warn("migration from " + peer + ": " + asked.error().describe());
    auto told = co_await link->write_message(error_message(asked.error()));
    (void)told;
    links_.erase(link);
    co_return;
  }
  auto watch = std::make_shared<IncomingWatch>(ex_);
  const bool paused = asked->paused;
  auto ticket = co_await broker_.incoming(std::move(asked->domain), paused, asked->copy_storage,
                                          false, watch);
  if (!ticket) {
    auto told = co_await link->write_message(error_message(ticket.error()));
    (void)told;
    links_.erase(link);
    co_return;
  }
  log::info("domain " + ticket->name + ": migrating in from " + peer +
            (link->tls() ? " over TLS" : " over plain TCP"));
  json::object body{{"name", ticket->name}};
  // copy_storage: the source opens one more connection per disk with this token (serve_nbd).
  // The incoming's token serves: nothing else sends it over the network.
  if (!ticket->nbd.empty()) {
    nbd_listeners_[ticket->token] = ticket->nbd;
    body["nbd"] = ticket->token;
  }
  json::object ready{{"status", 201}, {"body", std::move(body)}};
  auto answered = co_await link->write_message(ready);
  // The one-time listener takes the token first; the stream follows on the same connection.
  auto local = fdpass::connect_unix(ticket->endpoint);
  if (answered && local) {
    widen_relay_buffers(local->get());
    const std::string line = ticket->token + "\n";
    if (::send(local->get(), line.data(), line.size(), MSG_NOSIGNAL) ==
        static_cast<ssize_t>(line.size())) {
      asio::co_spawn(ex_, run_relay_to(link, std::move(*local)), asio::detached);
    }
  }
  // Whatever failed above, the incoming job ends by itself (no connection, a wrong token or an
  // ended stream) and tears its domain down.
  if (!watch->result) co_await watch->wake.async_wait(kAwait);
  Result<void> done =
      watch->result
          ? std::move(*watch->result)
          : Result<void>(Error(make_error_code(errc::internal), "the incoming job did not report"));
  nbd_listeners_.erase(ticket->token);
  json::object outcome =
      done ? json::object{{"status", 200},
                          {"body", json::object{{"name", ticket->name},
                                                {"state", paused ? "paused" : "running"}}}}
           : error_message(done.error());
  auto told = co_await link->write_message(outcome);
  if (!told) log::warn("domain " + ticket->name + ": " + told.error().describe());
  link->close();
  links_.erase(link);
}

namespace {

// The connection to the NBD listener the request's token names.
Result<fdpass::UniqueFd> nbd_listener_for(const std::map<std::string, std::string>& listeners,
                                          const json::value& request) {
  const auto* token = request.as_object().if_contains("nbd");
  auto it = token != nullptr && token->is_string() ? listeners.find(std::string(token->get_string()))
                                                   : listeners.end();
  if (it == listeners.end()) {
    return Error(make_error_code(errc::forbidden), "nbd: no incoming migration has that token");
  }
  auto connected = fdpass::connect_unix(it->second);
  if (!connected) return Error(connected.error(), "nbd: connecting to " + it->second);
  return std::move(*connected);
}

}  // namespace

awaitable<void> MigrationGateway::serve_query(std::shared_ptr<MigrationLink> link,
                                             json::value request) {
  const auto* name = request.as_object().if_contains("query");
  Result<DomainInfo> info = field_error("query", "must name a domain");
  if (name != nullptr && name->is_string()) info = co_await broker_.info(std::string(name->get_string()), false);
  const json::object answer = info ? json::object{{"status", 200}, {"body", info->to_json()}}
                                   : error_message(info.error());
  auto told = co_await link->write_message(answer);
  if (!told) log::warn("migration query from " + link->peer() + ": " + told.error().describe());
  link->close();
}

awaitable<void> MigrationGateway::serve_nbd(std::shared_ptr<MigrationLink> link, json::value request) {
  auto local = nbd_listener_for(nbd_listeners_, request);
  const json::object answer = local ? json::object{{"status", 200}} : error_message(local.error());
  auto told = co_await link->write_message(answer);
  if (!local || !told) {
    if (!local) log::warn("migration from " + link->peer() + ": " + local.error().describe());
    link->close();
    co_return;
  }
  co_await run_relay_both_ways(link, std::move(*local));
}

}  // namespace broker::daemon
