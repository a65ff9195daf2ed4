// A Broker on a fresh io_context, wired to temporary state/run directories, the test guest's
// image root and a uid range of the test's own.
#pragma once

#include <boost/asio/io_context.hpp>

#include "broker/control/broker.hpp"
#include "lifecycle_fixture.hpp"
#include "support/asio_run.hpp"

namespace qbtest {

struct BrokerFixture : LifecycleFixture {
  boost::asio::io_context io;
  broker::Broker broker;

  explicit BrokerFixture(uid_t base, broker::BrokerConfig config = {},
                         broker::lifecycle::UidKiller* custom_killer = nullptr)
      : LifecycleFixture(base, custom_killer),
        broker(io.get_executor(), with_state(std::move(config)), launcher, roots) {}

  broker::BrokerConfig with_state(broker::BrokerConfig c) {
    c.records_dir = state.path() + "/domains";
    return c;
  }

  template <class T>
  T run(boost::asio::awaitable<T> task) {
    return qbtest::run(io, std::move(task));
  }

  static broker::CreateDomain guest(const std::string& name) {
    broker::CreateDomain c;
    c.spec = guest_spec(name);
    return c;
  }
};

}  // namespace qbtest
