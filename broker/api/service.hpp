// Runs routed Commands against the Broker and turns each result into an Outcome. This is the
// glue between the pure router and the one command surface (style point 3): it decides nothing
// about HTTP framing and validates nothing the router has not validated already.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/json/object.hpp>
#include <optional>
#include <string>

#include "broker/api/router.hpp"
#include "broker/control/broker.hpp"

namespace broker::api {

struct ServiceConfig {
  std::string qemu_binary = "/usr/bin/qemu-system-x86_64";
  // The Xen mode's device models as GET /v1/xen shows them; unset outside the Xen mode.
  std::function<boost::json::value()> xen_view;
};

class Service {
 public:
  Service(Broker& broker, ServiceConfig config) : broker_(broker), config_(std::move(config)) {}

  // Every Command but WatchEvents, which the server streams itself.
  boost::asio::awaitable<Outcome> execute(Command command);

  Broker& broker() { return broker_; }

 private:
  boost::asio::awaitable<Outcome> run(GetVersion& c);
  boost::asio::awaitable<Outcome> run(ListDomains& c);
  boost::asio::awaitable<Outcome> run(CreateDomainCmd& c);
  boost::asio::awaitable<Outcome> run(GetDomain& c);
  boost::asio::awaitable<Outcome> run(DestroyDomain& c);
  boost::asio::awaitable<Outcome> run(RunStateCmd& c);
  boost::asio::awaitable<Outcome> run(InsertMediumCmd& c);
  boost::asio::awaitable<Outcome> run(EjectMediumCmd& c);
  boost::asio::awaitable<Outcome> run(AddDiskCmd& c);
  boost::asio::awaitable<Outcome> run(RemoveDiskCmd& c);
  boost::asio::awaitable<Outcome> run(AddNicCmd& c);
  boost::asio::awaitable<Outcome> run(RemoveNicCmd& c);
  boost::asio::awaitable<Outcome> run(SetVncCmd& c);
  boost::asio::awaitable<Outcome> run(RemoveVncCmd& c);
  boost::asio::awaitable<Outcome> run(SaveCmd& c);
  boost::asio::awaitable<Outcome> run(RestoreCmd& c);
  boost::asio::awaitable<Outcome> run(CancelJobCmd& c);
  boost::asio::awaitable<Outcome> run(MigrateCmd& c);
  boost::asio::awaitable<Outcome> run(IncomingCmd& c);
  boost::asio::awaitable<Outcome> run(QmpCmd& c);
  boost::asio::awaitable<Outcome> run(WatchEvents& c);
  boost::asio::awaitable<Outcome> run(GetMetrics& c);
  boost::asio::awaitable<Outcome> run(GetXen& c);
  boost::asio::awaitable<Outcome> run(GetPool& c);

  // The domain as it is now (no QMP round trip), after a command changed it.
  boost::asio::awaitable<Outcome> current(const std::string& name,
                                          http::status status = http::status::ok);
  // The failure of a command, or the domain as the command left it.
  boost::asio::awaitable<Outcome> done(const Result<void>& r, const std::string& name,
                                       http::status status = http::status::ok);

  Broker& broker_;
  ServiceConfig config_;
};

}  // namespace broker::api
