#!/usr/bin/env python3
# The tutorial's script, copied verbatim from "udp server & client in python"
# (../shared/seed/000_40d55de50cf97b5d.txt). The tests use its server() and client()
# as the reference peer for wire compatibility. Do not fix it: its bugs are the point.
import argparse
import json
import random
import socket

from datetime import datetime

MAX_BYTES = 65535
SAVE_RESULTS = True
FAULTY_SERVER = False

def randomVal(upperbound=1000):
    return random.randint(0, upperbound)

def server(host, port, log=False):
    '''
    If using the remote, the the interface should correspond to
    the ip address of the machine.
    '''
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print('Server listening at {}'.format(sock.getsockname()))
    while True:
        received_bytes, address = sock.recvfrom(MAX_BYTES)
        client_request = json.loads(received_bytes.decode())
        request = client_request[1]
        request_ID = client_request[0]
        print('Request ID: {}. Client request, {}'.format(request_ID, request))
        server_time =  'The time is {}'.format(datetime.now())
        if FAULTY_SERVER:
            if randomVal() > 500:
                request_ID+=1
        server_reply = [request_ID, server_time]
        send_reply = json.dumps(server_reply).encode()
        sock.sendto(send_reply, address)

def client(host, port, log=False):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    request_ID = randomVal()
    client_time = 'The time is {}'.format(datetime.now())
    if log:
        print('Request time: {}'.format(client_time))
    client_request = [request_ID, client_time]
    send_bytes = json.dumps(client_request).encode()
    sock.sendto(send_bytes, (host, port))
    received_bytes, address = sock.recvfrom(MAX_BYTES)
    server_reply = json.loads(received_bytes.decode())
    reply_ID = server_reply[0]
    if request_ID == reply_ID:
        print(server_reply[1])
        if log:
            print('Server time: {}'.format(server_reply[1]))
            print('Receipt time: {}'.format(datetime.now()))
    else:
        print('Server is a liar!')

if __name__ == '__main__':
    choices = {'client': client, 'server': server}
    parser = argparse.ArgumentParser(description=\
      'UDP server/client example with request ids and latency stats. \n'+\
      'Usage:\n '+\
      ' server: "python udp_remote_example.py server IPV4 PORT -measure_delay 1"'+\
      ' client: "python udp_remote_example.py client IPV4 PORT -measure_delay 1"'
    )
    parser.add_argument('role', choices=choices,
      help='which role to play: client or server'
    )
    parser.add_argument('host',  metavar='host', type=str, default='127.0.0.1',
      help='interface the server listens at, or host the client sends to'
    )
    parser.add_argument('port', metavar='port', type=int, default=1060,  
      help='UDP port (default 1060)'
    )
    parser.add_argument('--measure_delay', metavar='measure_delay',
      type=lambda s: s.lower() in ['true', 't', 'yes', '1'],
      default=False, help='measure the delay?'
    )
    args = parser.parse_args()
    function = choices[args.role]
    if args.measure_delay:
        if args.role == 'client':
            for x in range(1000):
                function(args.host, args.port, log=log)
        else:
            function(args.host, args.port, log=log)
    else:
        function(args.host, args.port)
