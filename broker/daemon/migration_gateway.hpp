// The destination's side of a migration from a broker on another host: qbrokerd's
// --migration-listen address. Each connection (TLS with a certificate of --migration-ca, or plain
// with --insecure-migration) carries one domain: its description, the answer, the stream, and
// the outcome (the protocol is in broker/control/migration_link.hpp). The domain is prepared
// as POST /v1/migrations prepares one (Broker::incoming); the gateway hands the incoming QEMU one
// end of a connection to its one-time listener and relays the stream into it.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/json/value.hpp>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "broker/control/broker.hpp"
#include "broker/core/error.hpp"

namespace broker::daemon {

class MigrationGateway {
 public:
  // `tls` null: plain TCP (--insecure-migration).
  MigrationGateway(boost::asio::any_io_executor ex, Broker& broker,
                   std::shared_ptr<boost::asio::ssl::context> tls);
  ~MigrationGateway();

  Result<void> listen(const boost::asio::ip::tcp::endpoint& at);
  boost::asio::ip::tcp::endpoint local_endpoint() const;
  void start();
  // Stops accepting and ends the connections still open (their domains are torn down by uid
  // when their streams end).
  void stop();

 private:
  boost::asio::awaitable<void> accept_loop();
  boost::asio::awaitable<void> serve(boost::asio::ip::tcp::socket sock);
  // One NBD connection of a copy_storage migration: relayed both ways to the incoming QEMU's NBD
  // listener that the token names.
  boost::asio::awaitable<void> serve_nbd(std::shared_ptr<MigrationLink> link,
                                         boost::json::value request);
  // {"query": NAME}: the domain as GET /v1/domains/NAME shows it, for a source restarted after
  // its state had all gone (Broker::settle_interrupted_migration).
  boost::asio::awaitable<void> serve_query(std::shared_ptr<MigrationLink> link,
                                           boost::json::value request);

  boost::asio::any_io_executor ex_;
  Broker& broker_;
  std::shared_ptr<boost::asio::ssl::context> tls_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::set<std::shared_ptr<MigrationLink>> links_;
  std::map<std::string, std::string> nbd_listeners_;  // token -> path, while the domain migrates in
  bool stopped_ = false;
};

}  // namespace broker::daemon
